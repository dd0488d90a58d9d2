import pytest

from ldmground.config import FINDING_NAMES, PRESETS, GroundingConfig, get_preset


def test_paper_preset_values():
    p = get_preset("paper")
    assert p.num_inference_steps == 300 and p.layers == (3, 4, 6, 7)
    assert p.window_indices() == range(120, 180)
    assert p.sigma == 2.5 and p.otsu and p.normalize_maps and p.pooling == "mean"
    assert p.replace(num_inference_steps=100).window_indices() == range(40, 60)


def test_digest_stable_and_sensitive():
    a = GroundingConfig()
    assert a.digest() == GroundingConfig().digest()
    assert a.digest() != a.replace(sigma=3.0).digest()
    assert GroundingConfig.from_dict(a.to_dict()) == a


def test_bad_values():
    with pytest.raises(ValueError):
        GroundingConfig(window=(0.6, 0.4))
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown GroundingConfig field"):
        GroundingConfig.from_dict({"sigmaa": 1})
    assert set(PRESETS) >= {"paper", "fast", "demo"}


def test_contrast_settings():
    paper = get_preset("paper")
    # configs without contrast keep the digests they had before the field existed
    assert "contrast" not in paper.to_dict() and "reference_phrases" not in paper.to_dict()
    on = paper.replace(contrast=0.5)
    assert on.to_dict()["reference_phrases"] == list(FINDING_NAMES) and len(FINDING_NAMES) == 8
    assert on.digest() != paper.digest() != on.replace(reference_phrases=("Edema",)).digest()
    assert GroundingConfig.from_dict(on.to_dict()) == on
    assert paper.replace(contrast=0.5, reference_phrases="Edema").reference_phrases == ("Edema",)
    with pytest.raises(ValueError, match="contrast must be >= 0"):
        paper.replace(contrast=-0.1)
    with pytest.raises(ValueError, match="at least one reference phrase"):
        paper.replace(contrast=0.5, reference_phrases=())
    with pytest.raises(ValueError, match="non-empty text"):
        paper.replace(contrast=0.5, reference_phrases=("Edema", " "))


def test_cli_contrast_options():
    from ldmground.cli import _config, build_parser

    base = ["evaluate", "--model", "demo", "--dataset", "x.csv", "--out", "o", "--preset", "demo"]
    assert _config(build_parser().parse_args(base)) == get_preset("demo")
    cfg = _config(build_parser().parse_args([*base, "--contrast", "0.7"]))
    assert cfg.contrast == 0.7 and cfg.reference_phrases == FINDING_NAMES
    refs = ["--reference-phrase", "Edema", "--reference-phrase", "No finding"]
    cfg = _config(build_parser().parse_args([*base, "--contrast", "1", *refs]))
    assert cfg.reference_phrases == ("Edema", "No finding")
