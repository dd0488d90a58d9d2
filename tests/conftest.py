import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on 2 cores: one thread avoids oversubscription (and the suite often shares the
# machine with other work); the results are the same for any thread count to ~1e-6.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    from ldmground.models.folder import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def xray():
    """A 72 x 90 (H x W) synthetic 'X-ray' in [0, 1] with a bright blob on the image left."""
    yy, xx = np.mgrid[0:72, 0:90]
    img = 0.3 + 0.4 * np.exp(-((xx - 25) ** 2 + (yy - 40) ** 2) / 80.0)
    return img.astype(np.float32)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (restored after): its thread pool is much slower
    than one thread on a busy 2-core machine, and code outside ldmground's own thread pin
    (MONAI networks, earlier tests' settings) would otherwise use it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
