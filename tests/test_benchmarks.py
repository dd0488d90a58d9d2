"""The benchmark scripts run end to end on the tiny model and report what they claim."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_grounding_counts_and_same_heatmap():
    out = _run("bench_grounding.py", "--model", "tiny", "--steps", "20", "--threads", "1")
    evals = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+evals=\s*(\d+)", out, re.M)}
    # N = 20 under the paper window (steps 8..11): 12 empty-prompt steps + 4 phrase rows,
    # against the reference's 20 steps x [empty, phrase].
    assert evals == {"ldmground": 16, "reference": 40, "bare": 16}
    diff = float(re.search(r"max \|ldmground - reference\| aggregated = (\S+);", out)[1])
    assert diff < 1e-4
    pattern = r"^RATIO reference/ldmground=(\S+) overhead=(\S+) evals=16 attn_mb=(\S+) ref_attn_mb=(\S+)$"
    ratio = re.search(pattern, out, re.M)
    assert ratio, out
    assert float(ratio[3]) < float(ratio[4]) / 10


def test_dtype_drift_reports_each_dtype(tmp_path):
    out = _run(
        "dtype_drift.py",
        "--model", "tiny", "--preset", "fast", "--limit", "3", "--pixel-samples", "1",
        "--threads", "1", "--out", str(tmp_path / "drift"),
    )  # fmt: skip
    line = re.search(r"^DRIFT dtype=bf16 cnr=(\S+) max_category_cnr=(\S+) .* max_pixel=(\S+) .* n=3$", out, re.M)
    assert line, out
    # bf16 changes the maps a little, not wholesale: heatmaps live in [0, 1]
    assert 0.0 <= float(line[3]) <= 1.0
    # the macro drift is a mean of the category drifts
    assert abs(float(line[1])) <= float(line[2]) + 1e-4
    # both runs are in the one resumable store: a rerun computes nothing
    again = _run(
        "dtype_drift.py",
        "--model", "tiny", "--preset", "fast", "--limit", "3", "--pixel-samples", "1",
        "--threads", "1", "--out", str(tmp_path / "drift"),
    )  # fmt: skip
    assert re.search(r"^fp32\s+3 samples \(0 computed now", again, re.M), again
    assert re.search(r"^bf16\s+3 samples \(0 computed now", again, re.M), again
    assert re.search(r"^DRIFT dtype=bf16 .*", again, re.M)[0] == line[0]
