import pytest

from ldmground.config import PRESETS, GroundingConfig, get_preset


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
