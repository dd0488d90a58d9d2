"""benchmarks/throughput.py and benchmarks/gpu_check.sh run end to end on the tiny model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SETTING = (
    r"^SETTING model=(\S+) dtype=(\S+) B=(\d+) images=(\d+) pairs=(\d+) steps=(\d+) rows=(\d+) seconds=(\S+) "
    r"pairs_per_min=(\S+) rows_per_s=(\S+) speedup=(\S+) peak_mb=(\S+)$"
)
FINAL = r"^THROUGHPUT model=(\S+) dtype=(\S+) B=(\d+) pairs_per_min=(\S+) speedup=(\S+) projected_1160_min=(\S+)$"


def _env() -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHON": sys.executable}


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _phrases_per_image(n: int) -> list[int]:
    df = pd.read_csv(ROOT / "data" / "phantom" / "test.csv")
    counts = df.groupby("path", sort=False)["label_text"].nunique()
    return list(counts.iloc[:n])


def test_quick_throughput_counts_rows_and_reports_the_best_setting():
    out = _run([sys.executable, "benchmarks/throughput.py", "--quick"])
    settings = re.findall(SETTING, out, re.M)
    assert [(m, d, int(b)) for m, d, b, *_ in settings] == [
        ("tiny", dtype, b) for dtype in ("fp32", "bf16") for b in (1, 2, 4)
    ], out
    # 50 steps, window 20..29: 30 empty-prompt rows per image, 10 per phrase, however batched
    phrases = _phrases_per_image(4)
    for *_, images, pairs, steps, rows, seconds, per_min, _rows_s, _speedup, _peak in settings:
        assert int(images) == 4 and int(pairs) == sum(phrases) and int(steps) == 50
        assert int(rows) == sum(30 + 10 * p for p in phrases)
        assert abs(float(per_min) - 60 * int(pairs) / float(seconds)) <= 0.01 * float(per_min)
    for dtype in ("fp32", "bf16"):
        mine = [s for s in settings if s[1] == dtype]
        base = float(mine[0][8])
        for s in mine:
            assert abs(float(s[10]) - float(s[8]) / base) < 0.01 + 0.001 * float(s[10])
    [final] = re.findall(FINAL, out, re.M)
    best = max(settings, key=lambda s: float(s[8]))
    assert final[:3] == best[:3]
    assert abs(float(final[3]) - float(best[8])) < 0.01 and abs(float(final[4]) - float(best[10])) < 0.01
    # the projection: 1,160 pairs x 240 rows at the best setting's seconds per row
    projected = 1160 * 240 * float(best[7]) / int(best[6]) / 60
    assert abs(float(final[5]) - projected) <= 0.05 + 0.01 * projected


def test_gpu_check_dry_run():
    out = _run(["bash", "benchmarks/gpu_check.sh", "--dry-run"])
    settings = re.findall(SETTING, out, re.M)
    assert [(d, int(b)) for _, d, b, *_ in settings] == [("bf16", 1), ("bf16", 2), ("fp32", 1), ("fp32", 2)], out
    drift = re.search(
        r"^DRIFT model=tiny pairs=2 max_abs_heatmap=(\S+) mean_abs_heatmap=(\S+) min_corr_raw=(\S+)$", out, re.M
    )
    assert drift, out
    max_abs, mean_abs, corr = map(float, drift.groups())
    assert 0 <= mean_abs <= max_abs <= 1 and 0.9 < corr <= 1  # bf16 moves the maps a little
    assert re.search(FINAL, out, re.M) and re.search(r"^gpu_check: done in \d+ s$", out, re.M)
