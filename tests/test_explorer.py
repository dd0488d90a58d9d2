"""The explorer's logic, headless (tiny model): two phrases on one inversion, what the view says,
errors that clear the map, class-name tokens as a visible choice, words instead of word pieces.

The browser side (layout, JavaScript, timings) is tests/test_explorer_browser.py.
"""

from pathlib import Path

import numpy as np
import pytest

from ldmground.config import GroundingConfig
from ldmground.method.tokens import TokenSelection, select_tokens, swap_sides
from ldmground.metrics import all_metrics
from ldmground.studies.cache import (
    class_token_indices,
    full_window,
    load_samples,
    phrase_attention,
    token_words,
)

pytest.importorskip("ipywidgets")

ROOT = Path(__file__).resolve().parents[1]
PHANTOM = ROOT / "data" / "phantom"
CFG = GroundingConfig(num_inference_steps=10, window=(0.4, 0.6), layers=(3, 4, 6, 7), sigma=2.5, otsu=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def samples():
    # 0: "Left upper lobe collapse" (Atelectasis: the class name is not in the phrase)
    # 1: "Moderate enlargement of the cardiac silhouette"; 2: "Focal consolidation in the left lower lobe"
    return load_samples(PHANTOM / "test.csv", PHANTOM, 3)


@pytest.fixture(scope="module")
def explorer(tiny_pipe, samples):
    from ldmground.studies.explorer import Explorer

    return Explorer(tiny_pipe, samples, PHANTOM, CFG)


def _nan0(x):
    return np.nan_to_num(x, nan=-1.0)


def test_the_second_phrase_is_the_swapped_first_on_the_same_inversion(explorer, samples):
    explorer.widgets["sample"].value = 0
    explorer.reset()
    first = samples[0]
    assert explorer.widgets["compare"].value == swap_sides(first.phrase) == "Right upper lobe collapse"
    assert explorer.shown == {"sample": 0, "phrase": first.phrase, "compare": "Right upper lobe collapse"}
    # both phrases and the reference phrases came from one walk
    assert explorer.unet_runs == 1
    # each set of metrics is the displayed heatmap's, against the boxes the caption names
    assert explorer.last_metrics == all_metrics(explorer.last_heatmap, first.boxes)
    assert explorer.last_compare_metrics == all_metrics(explorer.last_compare_heatmap, first.boxes)
    assert "boxes: its own" in explorer.panels[0].caption.value
    assert "boxes: sample 0's" in explorer.panels[1].caption.value
    assert not np.allclose(_nan0(explorer.last_heatmap), _nan0(explorer.last_compare_heatmap))
    # a slider moves both maps and changes both pictures, without a new inversion
    pics = [p.image.value for p in explorer.panels]
    explorer.widgets["sigma"].value = 8.0
    assert [p.image.value for p in explorer.panels] != pics
    assert all(a != b for a, b in zip(pics, [p.image.value for p in explorer.panels], strict=True))
    assert explorer.unet_runs == 1
    explorer.reset()
    assert explorer.widgets["sigma"].value == CFG.sigma
    assert [p.image.value for p in explorer.panels] == pics


def test_a_typed_comparison_stays_and_a_phrase_without_sides_has_none(explorer, samples):
    explorer.widgets["sample"].value = 1  # "Moderate enlargement ...": no side to swap
    assert explorer.widgets["compare"].value == ""
    assert explorer.last_compare_heatmap is None and explorer.last_compare_metrics == {}
    assert "type a second phrase" in explorer.panels[1].note.value
    explorer.widgets["compare"].value = "Small heart"
    assert explorer.shown["compare"] == "Small heart" and explorer.last_compare_heatmap is not None
    explorer.widgets["phrase"].value = "Enlarged heart on the left"  # a typed comparison is kept
    assert explorer.widgets["compare"].value == "Small heart"
    explorer.widgets["sample"].value = 0  # a new sample resets the comparison to the swap
    assert explorer.widgets["compare"].value == "Right upper lobe collapse"


def test_new_phrases_on_a_seen_image_go_through_phrase_attention_without_the_references(
    tiny_pipe, samples, monkeypatch
):
    from ldmground.studies import explorer as module

    calls = []

    def spy(pipe, image, phrases, config, references=(), on_step=None, **kwargs):
        calls.append((list(phrases), tuple(references)))
        return phrase_attention(pipe, image, phrases, config, references, on_step, **kwargs)

    monkeypatch.setattr(module, "phrase_attention", spy)
    ex = module.Explorer(tiny_pipe, samples, PHANTOM, CFG)
    assert calls == [(["Left upper lobe collapse", "Right upper lobe collapse"], CFG.reference_phrases)]
    ex.widgets["contrast"].value = 0.5  # the references are there already
    ex.widgets["phrase"].value = "Left lung opacity"
    assert calls[1:] == [(["Left lung opacity", "Right lung opacity"], ())]
    assert ex.unet_runs == 2 and ex.shown["phrase"] == "Left lung opacity"
    ex.widgets["phrase"].value = "Left upper lobe collapse"  # both seen: nothing runs
    assert len(calls) == 2


def test_a_phrase_recorded_alone_reads_what_a_joint_recording_reads(tiny_pipe, samples):
    from ldmground.method.heatmap import load_image

    image = load_image(PHANTOM / samples[0].path)
    cfg = full_window(CFG)
    steps = []
    alone = phrase_attention(
        tiny_pipe, image, ["Left upper lobe collapse"], cfg, on_step=lambda d, t: steps.append((d, t))
    )
    joint = phrase_attention(tiny_pipe, image, ["Right upper lobe collapse", "Left upper lobe collapse"], cfg)
    assert alone.maps[0].keys() == joint.maps[1].keys()
    for key, maps in alone.maps[0].items():
        np.testing.assert_allclose(maps.numpy(), joint.maps[1][key].numpy(), rtol=1e-4, atol=1e-6)
    # the progress callback counts every UNet call: the walk's N steps, then one phrase call per window step
    assert steps == [(i, 20) for i in range(1, 21)]


def test_errors_clear_the_maps_and_say_what_to_do(explorer, samples):
    explorer.widgets["sample"].value = 0
    explorer.reset()
    plain = explorer._png(explorer.image(samples[0]), None, samples[0].boxes)
    explorer.widgets["layers"].value = ()
    assert explorer.last_heatmap is None and explorer.last_metrics == {} and explorer.last_compare_metrics == {}
    assert "No layer selected" in explorer.status_widget.value and "No layer" in explorer.last_error
    assert all(p.image.value == plain for p in explorer.panels)
    assert "—" in explorer.panels[0].metrics.value
    explorer.reset()
    assert explorer.last_error is None and explorer.last_heatmap is not None
    explorer.widgets["phrase"].value = "   "
    assert explorer.last_heatmap is None and "phrase is empty" in explorer.status_widget.value
    explorer.widgets["phrase"].value = samples[0].phrase
    assert explorer.last_heatmap is not None and explorer.last_error is None


def test_class_tokens_absent_from_the_phrase_are_a_visible_choice(explorer, samples):
    explorer.widgets["sample"].value = 0  # Atelectasis, "Left upper lobe collapse"
    explorer.reset()
    by_phrase = explorer.last_heatmap.copy()
    assert explorer.widgets["no_class"].disabled  # only meaningful for class-name tokens
    explorer.widgets["tokens"].value = "class"
    assert not explorer.widgets["no_class"].disabled
    assert "“Atelectasis” not in the phrase: all phrase tokens read" in explorer.panels[0].note.value
    np.testing.assert_array_equal(_nan0(explorer.last_heatmap), _nan0(by_phrase))
    explorer.widgets["no_class"].value = "none"
    assert explorer.last_heatmap is None and explorer.last_metrics == {}
    assert "no map (authors' rule)" in explorer.panels[0].note.value
    # a phrase with the class name reads only its words, shown as words
    explorer.widgets["sample"].value = 2  # Consolidation, "Focal consolidation in the left lower lobe"
    assert explorer.last_heatmap is not None
    assert "reads: consolidation<" in explorer.panels[0].note.value
    explorer.reset()
    assert explorer.widgets["no_class"].value == "all" and explorer.widgets["tokens"].value == CFG.tokens


def test_class_token_indices_falls_back_only_when_asked():
    sel = TokenSelection((1, 2, 3), ("Left", "upper", "collapse"), ("left", "upper", "collapse"))
    assert class_token_indices(sel, "Atelectasis") == (0, 1, 2)
    assert class_token_indices(sel, "Atelectasis", fallback=False) == ()
    assert class_token_indices(sel, "Upper", fallback=False) == (1,)


def test_token_words_joins_word_pieces(tiny_pipe):
    bert = TokenSelection(
        tuple(range(1, 9)),
        ("Small", "left-sided", "left-sided", "left-sided", "pleural", "pleural", "effusion", "effusion"),
        ("small", "left", "-", "sided", "pl", "##eural", "e", "##ffusion"),
    )
    assert token_words(bert) == ["Small", "left-sided", "pleural", "effusion"]
    assert token_words(bert, [4, 5, 6, 7]) == ["pleural", "effusion"]
    clip = select_tokens(tiny_pipe.tokenizer, "Small apical pneumothorax")  # CLIP BPE: </w> pieces
    assert len(clip.pieces) > 3 and token_words(clip) == ["Small", "apical", "pneumothorax"]


def test_layer_labels_name_block_and_the_recorded_resolution(tiny_pipe, explorer, samples):
    from ldmground.studies.explorer_layout import layer_labels

    labels = layer_labels(tiny_pipe)
    cache = explorer.cached(samples[0], samples[0].phrase)
    assert len(labels) == len(cache.layers) == 11
    for i, label in enumerate(labels):
        h, w = cache.maps[(i, cache.steps[0])].shape[-2:]
        assert label.startswith(f"{i} · ") and label.endswith(f" · {h}x{w}")
    assert labels[0].startswith("0 · down 1.0") and labels[4].startswith("4 · mid")
    assert labels[5].startswith("5 · up 0.0")
    assert [label for _, label in [(v, lab) for lab, v in explorer.widgets["layers"].options]] == labels


def test_a_typed_phrase_on_a_seen_image_reuses_the_walk(explorer, samples):
    """The explorer keeps each image's empty-prompt walk (a TrajectoryCache): a phrase typed
    later on the same image runs only the window's phrase evaluations."""
    sample = samples[0]
    explorer.cached(sample, sample.phrase)  # the image's first recording walks the whole path
    calls = []
    handle = explorer.pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        explorer.cached(sample, "a phrase typed later")
    finally:
        handle.remove()
    window = list(explorer.record_config.window_indices())
    assert explorer.trajectories.hits >= 1
    assert len(calls) == len(window)  # one phrase call per window step, no walk
