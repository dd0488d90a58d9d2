"""The results store of a batch run: one SQLite row per finished pair, committed as soon as
its image is done, keyed so that a rerun skips what is done and recomputes what changed."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


METRICS = ["cnr", "cnr_signed", "cnr_union", "miou", "auc_roc", "auc_roc_binned", "pointing"]
COLUMNS = [
    "key",
    "sample_id",
    "dicom_id",
    "category",
    "phrase",
    "model",
    "config_hash",
    *METRICS,
    "unet_evals",
    "seconds",
    "status",
    "message",
]


# --- grounders: anything that turns (image, phrases) into original-frame heatmaps ---------


RESULTS_VERSION = 3


def sample_key(sample_id: str, config_hash: str, model: str, weights: str = "", batch: int = 1) -> str:
    """The store's primary key; ``weights`` is :attr:`Grounder.weights_digest`, ``batch`` the
    images per UNet batch of a grounder whose results depend on it (1: not in the key)."""
    text = f"{sample_id}|{config_hash}|{model}" + (f"|{weights}" if weights else "") + f"|v{RESULTS_VERSION}"
    if batch != 1:
        text += f"|b{batch}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class ResultStore:
    """SQLite results table; every write is its own committed transaction."""

    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA busy_timeout=60000")
        cols = ", ".join(f"{c} {'TEXT PRIMARY KEY' if c == 'key' else ''}" for c in COLUMNS)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS results ({cols})")
        self.db.execute("CREATE TABLE IF NOT EXISTS batch_sizes (run TEXT PRIMARY KEY, batch_images INTEGER)")

    def batch_size(self, run: str, proposed: int) -> int:
        """The images per batch of ``run`` (model, weights, config): the first one any process
        stored, else ``proposed`` (stored now)."""
        self.db.execute("INSERT OR IGNORE INTO batch_sizes VALUES (?, ?)", (run, proposed))
        return int(self.db.execute("SELECT batch_images FROM batch_sizes WHERE run = ?", (run,)).fetchone()[0])

    def done_keys(self) -> set[str]:
        return {k for (k,) in self.db.execute("SELECT key FROM results")}

    def write(self, rows: list[dict]) -> None:
        marks = ", ".join("?" for _ in COLUMNS)
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany(
            f"INSERT OR REPLACE INTO results ({', '.join(COLUMNS)}) VALUES ({marks})",
            [[r.get(c) for c in COLUMNS] for r in rows],
        )
        self.db.execute("COMMIT")

    def frame(self, model: str, config_hash: str) -> pd.DataFrame:
        return pd.read_sql_query(
            "SELECT * FROM results WHERE model = ? AND config_hash = ? ORDER BY rowid",
            self.db,
            params=(model, config_hash),
        )

    def close(self) -> None:
        self.db.close()


# --- the run ---------------------------------------------------------------------------------
