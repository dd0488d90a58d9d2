"""Small MS-CXR-format data sets made on the fly."""

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ldmground.config import GroundingConfig
from ldmground.datasets.phantom.anatomy import MSCXR_COLUMNS

# Few steps, same structure as the paper preset: cheap enough for every test.
QUICK = GroundingConfig(num_inference_steps=10, window=(0.4, 0.6), sigma=2.5, otsu=True)


def blob_image(width: int, height: int, cx: float, cy: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return (0.2 + 0.6 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.02 * width * height))).astype(np.float32)


def write_dataset(root: Path, n_images: int = 3, size=(96, 80)) -> Path:
    """n images, each with a one-box phrase; image 0 also has a two-box phrase."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    w, h = size
    for i in range(n_images):
        cx, cy = w * (0.3 + 0.2 * (i % 3)), h * 0.5
        img = blob_image(w, h, cx, cy)
        path = f"images/img{i}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(root / path)
        rows.append([f"d{i}", "Pneumonia", f"opacity number {i}", path, cx - 10, cy - 10, 20, 20, w, h, "test"])
        if i == 0:
            rows.append([f"d{i}", "Edema", "bilateral haze", path, 10, 20, 20, 30, w, h, "test"])
            rows.append([f"d{i}", "Edema", "bilateral haze", path, 60, 20, 20, 30, w, h, "test"])
    df = pd.DataFrame(rows, columns=MSCXR_COLUMNS)
    csv = root / "test.csv"
    df.to_csv(csv, index=False)
    return csv


def stored_rows(db: Path) -> int:
    """Rows committed to an ``evaluate`` results store so far (0 before it exists)."""
    import sqlite3

    if not Path(db).is_file():
        return 0
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute("SELECT count(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # table not created yet
        return 0
    finally:
        con.close()


def kill_after_rows(cmd: list[str], cwd: Path, env: dict, db: Path, rows: int, poll: float = 0.01) -> dict[str, float]:
    """Start ``cmd``, SIGKILL it once ``db`` holds ``rows`` committed rows, and return what
    the store holds then (key -> seconds). Fails when the run ends before it can be killed."""
    import signal
    import sqlite3
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline and stored_rows(db) < rows:
            time.sleep(poll)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT key, seconds FROM results").fetchall())
    finally:
        con.close()
