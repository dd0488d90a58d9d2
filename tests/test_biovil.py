"""BioViL / BioViL-T baselines (ldmground.models.biovil), offline: the real network classes with
random weights (small widths where the class allows it), hand-made embeddings, and, where
PyPI ``hi-ml-multimodal`` is installed (requirements-nodeps.txt), its own text model and
post-processing as the reference."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmground.errors import LdmGroundError
from ldmground.models.biovil import (
    BERT_BASE,
    RESIZE,
    SMALL,
    SMALL_BERT,
    SMOOTH_SIGMA,
    VARIANTS,
    BiovilImageModel,
    CxrBertTextModel,
    ResNet50,
    bert_tokenizer,
    build_biovil_networks,
    load_image_state,
    load_text_state,
    toy_vocab,
    variant,
)
from ldmground.runs.biovil import (
    BiovilGrounder,
    clamp_at_zero,
    crop_origin,
    grid_to_original,
    grounder_from_spec,
    make_biovil_grounder,
    parse_biovil_spec,
    preprocess,
    random_biovil_grounder,
    remap_to_uint8,
    resized_size,
    similarity_grid,
)

KINDS = ["biovil", "biovil-t"]


def xray(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An 8-bit 'X-ray' as ldmground's load_image returns it (k / 255, float32), 0 and 255 present."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = 70 + 120 * np.exp(-((xx - 0.3 * width) ** 2 + (yy - 0.5 * height) ** 2) / (0.02 * width * height))
    img = np.clip(img + rng.normal(0, 15, img.shape), 0, 255).astype(np.uint8)
    img.flat[0], img.flat[-1] = 0, 255
    return (img / 255.0).astype(np.float32)


def spread(g: BiovilGrounder) -> BiovilGrounder:
    """Random-init embeddings barely depend on the input (cosine ~0.99 between phrases); wider
    weights and no output biases make them differ, as trained ones do."""
    with torch.no_grad():
        g.image_model.projector.model[3].bias.zero_()
        g.text_model.cls_projection_head.dense_to_output.bias.zero_()
        for p in g.text_model.bert.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)
    return g


@pytest.fixture(scope="module", params=KINDS)
def grounder(request):
    return spread(random_biovil_grounder(request.param, small=True, seed=0))


# --- facts taken from hi-ml-multimodal 0.2.2 and eval_biovil_t.py ---------------------------


def test_variants_follow_himl():
    assert (VARIANTS["biovil"].crop_size, VARIANTS["biovil-t"].crop_size) == (480, 448)
    assert RESIZE == 512 and SMOOTH_SIGMA == 1.5
    assert VARIANTS["biovil"].repo_id == "microsoft/BiomedVLP-CXR-BERT-specialized"
    assert VARIANTS["biovil-t"].repo_id == "microsoft/BiomedVLP-BioViL-T"
    assert not VARIANTS["biovil"].multi_image and VARIANTS["biovil-t"].multi_image


def test_resnet50_has_torchvision_layout():
    """torchvision's resnet50(): 320 state-dict entries, 25,557,032 parameters."""
    net = ResNet50()
    sd = net.state_dict()
    assert len(sd) == 320
    assert sum(p.numel() for p in net.parameters()) == 25_557_032
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: stride on the 3x3
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)
    assert sd["fc.weight"].shape == (1000, 2048)


@pytest.mark.parametrize("kind, grid, feat", [("biovil", 15, 2048), ("biovil-t", 14, 512)])
def test_full_size_image_model(kind, grid, feat):
    model = BiovilImageModel(VARIANTS[kind].multi_image).eval()
    assert model.encoder.out_channels == feat
    crop = VARIANTS[kind].crop_size
    emb = model.patch_embeddings(torch.rand(1, 3, crop, crop))
    assert emb.shape == (1, grid, grid, 128)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(1, grid, grid), atol=1e-5)


# --- preprocessing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, crop, resized, origin",
    [
        # torchvision Resize(512): short side 512, long side int(512 * long / short);
        # CenterCrop(c): left/top = int(round(margin / 2)), Python's round half to even.
        (700, 600, 480, (597, 512), (58, 16)),  # round(58.5) = 58
        (700, 600, 448, (597, 512), (74, 32)),  # round(74.5) = 74
        (600, 701, 480, (512, 598), (16, 59)),
        (600, 701, 448, (512, 598), (32, 75)),
        (90, 72, 480, (640, 512), (80, 16)),  # upscaling
    ],
)
def test_preprocess_matches_plain_transform(width, height, crop, resized, origin):
    img = xray(width, height)
    u8 = np.rint(img * 255).astype(np.uint8)
    left, top = origin
    plain = Image.fromarray(u8).resize(resized, Image.BILINEAR).crop((left, top, left + crop, top + crop))
    expected = np.asarray(plain, dtype=np.float32) / 255
    x = preprocess(img, crop)
    assert x.shape == (1, 3, crop, crop) and x.dtype == torch.float32
    for c in range(3):
        np.testing.assert_array_equal(x[0, c].numpy(), expected)
    assert resized_size(width, height) == resized and crop_origin(*resized, crop) == origin


def test_intensity_remap_like_himl_load_image():
    """min-max to [0, 255] and truncation, on the file's integers (8- and 16-bit)."""
    rng = np.random.default_rng(3)
    k = rng.integers(40, 201, (30, 40)).astype(np.float64)
    expected = ((k - k.min()) / (k - k.min()).max() * 255).astype(np.uint8)
    np.testing.assert_array_equal(remap_to_uint8((k / 255).astype(np.float32)), expected)
    k16 = rng.integers(1000, 60001, (30, 40)).astype(np.float64)
    expected16 = ((k16 - k16.min()) / (k16 - k16.min()).max() * 255).astype(np.uint8)
    np.testing.assert_array_equal(remap_to_uint8((k16 / 65535).astype(np.float32)), expected16)
    full = np.arange(256, dtype=np.float64)  # 8-bit image already spanning 0..255: unchanged
    np.testing.assert_array_equal(remap_to_uint8((full / 255).astype(np.float32)), full.astype(np.uint8))
    assert remap_to_uint8(np.full((4, 4), 0.5, np.float32)).max() == 0  # constant image


# --- heatmap geometry, clamping, hand-made embeddings ----------------------------------------


@pytest.mark.parametrize(
    "kind, side, pad",
    [
        # side = int(crop * short / 512); (left, right, top, bottom) = floor/ceil of margins / 2
        ("biovil", 562, (69, 69, 19, 19)),
        ("biovil-t", 525, (87, 88, 37, 38)),
    ],
)
def test_heatmap_shape_and_nan_strips(kind, side, pad):
    g = spread(random_biovil_grounder(kind, small=True))
    hm = g(xray(700, 600), ["left effusion"], [[]]).maps[0]
    assert hm.shape == (600, 700) and hm.dtype == np.float32
    left, right, top, bottom = pad
    inside = np.zeros((600, 700), bool)
    inside[top : 600 - bottom, left : 700 - right] = True
    assert inside.sum() == side * side
    np.testing.assert_array_equal(np.isnan(hm), ~inside)


def test_negative_similarity_becomes_zero(grounder):
    raw = np.array([[np.nan, -0.5, 0.0], [0.25, -1e-6, np.nan]], np.float32)
    out = clamp_at_zero(raw)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(raw))
    np.testing.assert_array_equal(out[~np.isnan(out)], [0.0, 0.0, 0.25, 0.0])
    img = xray(300, 260)
    patches = grounder.patch_embeddings(img)
    text = -patches[3, 5]  # cosine -1 with one patch
    grid = similarity_grid(patches, text, grounder.sigma)
    assert grid.min() < 0
    hm = grounder.heatmap(patches, text, 300, 260)
    finite = hm[np.isfinite(hm)]
    assert finite.min() == 0.0 and (finite >= 0).all()
    n = grid.shape[0]
    for i, j in [(3, 5), divmod(int(grid.argmin()), n), divmod(int(grid.argmax()), n)]:
        np.testing.assert_array_equal(
            np.unique(hm[_block_of(i, j, n, 300, 260, grounder.variant.crop_size)]), [max(float(grid[i, j]), 0.0)]
        )


def _block_of(i: int, j: int, n: int, width: int, height: int, crop: int) -> np.ndarray:
    """Original-frame pixels that nearest-neighbour upsampling takes from patch (i, j)."""
    side = int(crop * min(width, height) / 512)
    left, top = (width - side) // 2, (height - side) // 2
    src = np.floor(np.arange(side) * (n / side)).astype(int)
    mask = np.zeros((height, width), bool)
    mask[np.ix_(top + np.flatnonzero(src == i), left + np.flatnonzero(src == j))] = True
    return mask


def test_text_equal_to_a_patch_embedding_peaks_there(grounder):
    width, height, crop = 320, 280, grounder.variant.crop_size
    patches = grounder.patch_embeddings(xray(width, height, seed=1))
    n = patches.shape[0]
    i, j = 4, n - 3
    # the networks' own patch embedding, no smoothing: that patch has cosine 1, the maximum
    grounder.sigma = 0
    try:
        hm = grounder.heatmap(patches, patches[i, j], width, height)
    finally:
        grounder.sigma = SMOOTH_SIGMA
    assert np.nanmax(hm) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(hm == np.nanmax(hm), _block_of(i, j, n, width, height, crop))
    # hand-made orthogonal patch embeddings, with the smoothing: a Gaussian centred there
    onehot = torch.eye(n * n).reshape(n, n, n * n)
    hm = grounder.heatmap(onehot, onehot[i, j], width, height)
    np.testing.assert_array_equal(hm == np.nanmax(hm), _block_of(i, j, n, width, height, crop))


@pytest.mark.parametrize("kind", KINDS)
def test_phrase_change_changes_the_map(kind):
    g = spread(random_biovil_grounder(kind, small=True))
    img = xray(400, 350)
    # Random patch embeddings all point much the same way, so most phrases come out negative
    # everywhere (all 0 after the clamp); a text-head bias along their mean makes them positive.
    mean = g.patch_embeddings(img).mean(dim=(0, 1))
    raw = g.text_model.cls_projection_head(g.text_model.bert(torch.tensor([[2, 10, 3]])).last_hidden_state[:, 0])
    with torch.no_grad():
        g.text_model.cls_projection_head.dense_to_output.bias.copy_(2 * raw.norm() * mean / mean.norm())
    a, b, a2 = g(img, ["small left pleural effusion", "cardiomegaly", "small left pleural effusion."], [[]] * 3).maps
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert np.nanmax(a) > 0 and np.nanmax(b) > 0
    assert np.nanmax(np.abs(a - b)) > 1e-3
    np.testing.assert_array_equal(a, a2)  # trailing "!?." stripped, as hi-ml does


def test_check_phrase(grounder):
    assert grounder.check_phrase("Small left effusion") == []
    assert grounder.check_phrase("[MASK] effusion") == []  # hi-ml allows [MASK]
    for bad in ["", "  ", "[CLS] effusion", "effusion [SEP]", "a " * 600]:
        with pytest.raises(LdmGroundError):
            grounder.check_phrase(bad)


# --- loading checkpoints ---------------------------------------------------------------------


def test_image_state_loading():
    model = BiovilImageModel(True, **SMALL)
    state = dict(model.state_dict())
    state["encoder.vit_pooler.blocks.0.attn.proj_q.weight"] = torch.zeros(16, 16)  # BioViL-T's unused pooler
    load_image_state(model, state, "ok")
    single = BiovilImageModel(False, **SMALL)
    with pytest.raises(LdmGroundError, match="unexpected"):
        load_image_state(single, dict(single.state_dict(), **{"encoder.vit_pooler.x": torch.zeros(1)}))
    partial = {k: v for k, v in single.state_dict().items() if not k.startswith("projector.")}
    with pytest.raises(LdmGroundError, match="missing"):
        load_image_state(single, partial)


def _cxr_bert_checkpoint(text: CxrBertTextModel) -> dict[str, torch.Tensor]:
    """A CXRBertModel-style state dict: bert.*, cls_projection_head.*, plus the MLM head and the
    position-id buffer that transformers 4.x checkpoints carry."""
    state = dict(text.state_dict())
    hidden = text.bert.config.hidden_size
    state["bert.embeddings.position_ids"] = torch.arange(text.max_length)[None]
    state["cls.predictions.bias"] = torch.zeros(text.bert.config.vocab_size)
    state["cls.predictions.transform.dense.weight"] = torch.zeros(hidden, hidden)
    return state


def test_text_state_loading():
    _, text = build_biovil_networks("biovil", small=True, seed=1, vocab_size=50)
    _, other = build_biovil_networks("biovil", small=True, seed=2, vocab_size=50)
    load_text_state(other, _cxr_bert_checkpoint(text), "ok")
    ids = torch.tensor([[2, 10, 11, 3]])
    torch.testing.assert_close(other.embed(ids, torch.ones_like(ids)), text.embed(ids, torch.ones_like(ids)))
    with pytest.raises(LdmGroundError, match="unexpected"):
        load_text_state(other, dict(text.state_dict(), **{"bert.extra": torch.zeros(1)}))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_grounder_from_a_weights_folder(tmp_path, monkeypatch):
    """The Hub repo's files in a folder: full-size image model, a small CXR-BERT config."""
    v = VARIANTS["biovil-t"]
    vocab = toy_vocab()
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "X"}))
    cfg = {**BERT_BASE, **SMALL_BERT, "projection_size": 128, "vocab_size": len(vocab), "model_type": "cxr-bert"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    text = CxrBertTextModel(cfg).eval()
    torch.save(_cxr_bert_checkpoint(text), tmp_path / "pytorch_model.bin")
    image = BiovilImageModel(True)
    state = dict(image.state_dict(), **{"encoder.vit_pooler.norm_post.weight": torch.ones(256)})
    torch.save(state, tmp_path / v.image_weights)

    with pytest.raises(LdmGroundError, match="MD5"):
        make_biovil_grounder("biovil-t", str(tmp_path))
    monkeypatch.setitem(
        VARIANTS, "biovil-t", dataclasses.replace(v, image_weights_md5=_md5(tmp_path / v.image_weights))
    )
    g = grounder_from_spec(f"biovil-t:{tmp_path}")
    assert g.spec == f"biovil-t:{tmp_path}" and g.image_size == 448
    assert {p.name for p in g.weight_files} == {v.image_weights, "pytorch_model.bin", "vocab.txt", "config.json"}
    for k, t in image.state_dict().items():
        torch.testing.assert_close(g.image_model.state_dict()[k], t)
    ids = torch.tensor([[2, 10, 11, 3]])
    torch.testing.assert_close(g.text_model.embed(ids, torch.ones_like(ids)), text.embed(ids, torch.ones_like(ids)))
    hm = g(xray(120, 100), ["effusion"], [[]]).maps[0]
    assert hm.shape == (100, 120) and np.isfinite(hm).any()

    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(LdmGroundError, match="lacks"):
        make_biovil_grounder("biovil-t", str(tmp_path))


def test_hub_weights_offline_without_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(LdmGroundError, match=r"microsoft/BiomedVLP-CXR-BERT-specialized@v1\.1"):
        make_biovil_grounder("biovil")


def test_specs():
    assert parse_biovil_spec("biovil") == ("biovil", None)
    assert parse_biovil_spec("biovil-t:/data/w") == ("biovil-t", "/data/w")
    assert parse_biovil_spec("biovil:random") == ("biovil", "random")
    assert parse_biovil_spec("tiny") is None and parse_biovil_spec("biovilx") is None
    with pytest.raises(LdmGroundError):
        variant("biovil-x")


def test_evaluate_runs_with_the_biovil_grounder(tmp_path):
    from ldmground.config import GroundingConfig
    from ldmground.runs.evaluation import evaluate

    from .helpers import write_dataset

    csv = write_dataset(tmp_path / "ds", n_images=2)
    g = spread(random_biovil_grounder("biovil", small=True))
    report = evaluate(g, csv, None, tmp_path / "out", GroundingConfig(), progress=False)
    assert report.failed == 0 and report.succeeded == 3
    assert set(report.results["model"]) == {"biovil:random"}


# --- hi-ml-multimodal's own code as the reference (where it is installed) ---------------------


@pytest.fixture
def himl(monkeypatch):
    """Import hi-ml-multimodal's torchvision-free modules without running its package
    ``__init__`` files, which import torchvision (not importable beside a CPU torch)."""
    spec = importlib.util.find_spec("health_multimodal")
    if spec is None:
        pytest.skip("hi-ml-multimodal is not installed (pip install --no-deps -r requirements-nodeps.txt)")
    root = Path(spec.submodule_search_locations[0])
    before = set(sys.modules)
    for pkg in ["", ".text", ".text.model", ".text.data", ".image", ".image.model", ".vlp"]:
        mod = types.ModuleType("health_multimodal" + pkg)
        mod.__path__ = [str(root / pkg.strip(".").replace(".", "/"))]
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    # vlp/inference_engine.py imports these two names; its static methods need neither
    sys.modules["health_multimodal.image"].ImageInferenceEngine = object
    sys.modules["health_multimodal.text"].TextInferenceEngine = object
    yield lambda name: importlib.import_module("health_multimodal." + name)
    for name in set(sys.modules) - before:
        if name.startswith("health_multimodal"):
            del sys.modules[name]


def test_text_embedding_equals_himl(himl):
    """hi-ml's CXRBertModel + TextInferenceEngine vs CxrBertTextModel + our tokenisation."""
    cxr = himl("text.model.modelling_cxrbert")
    conf = himl("text.model.configuration_cxrbert")
    engine_mod = himl("text.inference_engine")
    cfg = conf.CXRBertConfig(**{**BERT_BASE, **SMALL_BERT, "vocab_size": len(toy_vocab())})
    torch.manual_seed(5)
    ref = cxr.CXRBertModel(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)
    ours = CxrBertTextModel(cfg.to_dict())
    load_text_state(ours, ref.state_dict(), "hi-ml")
    tok = bert_tokenizer(toy_vocab())
    # hi-ml 0.2.2 calls batch_encode_plus, which transformers 5 dropped: same call, new name
    tok.batch_encode_plus = lambda batch_text_or_text_pairs, **kw: tok(batch_text_or_text_pairs, **kw)
    engine = engine_mod.TextInferenceEngine(tok, ref)
    g = BiovilGrounder("biovil", BiovilImageModel(False, **SMALL), ours, tok)
    for phrase in ["Small left pleural effusion.", "cardiomegaly!", "[MASK] opacity"]:
        want = engine.get_embeddings_from_prompt(phrase, verbose=False)[0]
        torch.testing.assert_close(g.text_embedding(phrase), want, rtol=0, atol=1e-6)


def test_projector_equals_himl_mlp(himl):
    mlp = himl("image.model.modules").MLP(input_dim=2048, output_dim=128, hidden_dim=128, use_1x1_convs=True).eval()
    ours = BiovilImageModel(False).projector
    ours.load_state_dict(mlp.state_dict())
    x = torch.randn(1, 2048, 3, 3)
    torch.testing.assert_close(ours.model.eval()(x), mlp(x))


@pytest.mark.parametrize("crop, n", [(480, 15), (448, 14)])
def test_similarity_map_equals_himl(himl, crop, n):
    """_get_similarity_map_from_embeddings + convert_similarity_to_image_size, bit for bit."""
    engine = himl("vlp.inference_engine").ImageTextInferenceEngine
    rng = np.random.default_rng(crop)
    for width, height in [(700, 600), (600, 701), (2544, 3056), (90, 72), (512, 512)]:
        p = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(n, n, 128))).float(), dim=-1)
        t = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(1, 128))).float(), dim=-1)
        grid = engine._get_similarity_map_from_embeddings(p, t)
        want = engine.convert_similarity_to_image_size(grid, width, height, 512, crop, None, "nearest")
        got = grid_to_original(similarity_grid(p, t[0]), width, height, crop)
        np.testing.assert_array_equal(got, want)
