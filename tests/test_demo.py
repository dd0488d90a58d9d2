import json
import shutil

import numpy as np
import pytest
import torch

from ldmground.demo import DEMO_DIR, swap_sides, verify_hashes
from ldmground.errors import LdmGroundError


def test_swap_sides():
    assert swap_sides("Small left-sided pleural effusion. Right lung clear") == (
        "Small right-sided pleural effusion. Left lung clear"
    )
    assert swap_sides("Enlarged cardiac silhouette") == "Enlarged cardiac silhouette"


def test_shipped_weights_match_their_hashes(tmp_path):
    verify_hashes(DEMO_DIR)
    copy = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, copy)
    target = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(LdmGroundError, match="does not match its SHA-256"):
        verify_hashes(copy)


def test_demo_reads_the_side_word():
    """On lateral findings of the committed split, the true phrase's heatmap is higher in the
    box than the same phrase with left/right swapped (the model uses the text)."""
    from ldmground.datasets.mscxr import load_mscxr
    from ldmground.grounding import ground
    from ldmground.heatmap import load_image
    from ldmground.metrics import cnr
    from ldmground.models import load_pipeline

    pipe = load_pipeline("demo")
    samples, _ = load_mscxr(DEMO_DIR.parent / "phantom" / "test.csv")
    lateral = [s for s in samples if s.category in ("Pleural Effusion", "Pneumothorax")][:8]
    true_cnr, swapped_cnr = [], []
    for s in lateral:
        image = load_image(DEMO_DIR.parent / "phantom" / s.path)
        a, b = ground(pipe, image, [s.phrase, swap_sides(s.phrase)], "demo")
        true_cnr.append(cnr(a.heatmap, s.boxes, signed=True))
        swapped_cnr.append(cnr(b.heatmap, s.boxes, signed=True))
    assert np.mean(true_cnr) > np.mean(swapped_cnr) + 0.2


def test_export_demo_writes_a_loadable_hashed_folder(tmp_path):
    from ldmground.demo import DemoTrainConfig, demo_unet, demo_vae, export_demo
    from ldmground.models import load_pipeline

    unet = demo_unet(384)
    dest = export_demo(demo_vae(), unet, 0.5, DemoTrainConfig(), 123, tmp_path / "model", {"machine": "test"})
    verify_hashes(dest)
    assert sorted(line.split()[1] for line in (dest / "SHA256SUMS").read_text().splitlines()) == [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    meta = json.loads((dest / "ldmground.json").read_text())
    assert meta["training"]["unet_steps_done"] == 123 and meta["training"]["machine"] == "test"
    pipe = load_pipeline(str(dest))
    assert (pipe.scaling_factor, pipe.max_length, pipe.use_attention_mask, pipe.image_size) == (0.5, 16, True, 64)
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    loaded = pipe.unet.state_dict()
    for name, value in unet.state_dict().items():
        assert torch.equal(loaded[name], value), name
