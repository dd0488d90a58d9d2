import numpy as np
import pytest
from transformers import AutoTokenizer

from ldmground.errors import LdmGroundError
from ldmground.method.tokens import select_tokens
from ldmground.models.text import _minilm_dir, clip_tokenizer


@pytest.fixture(scope="module")
def clip():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def wordpiece():
    return AutoTokenizer.from_pretrained(_minilm_dir())


def test_clip_vocab_matches_sd2(clip):
    assert len(clip) == 49408
    assert clip.tokenize("pneumothorax") == ["pneu", "mo", "thor", "ax</w>"]
    ids = clip("effusion", padding="max_length", max_length=8)["input_ids"]
    assert ids[0] == 49406 and ids[3] == 49407  # start, 2 pieces, end
    assert ids[4:] == [0, 0, 0, 0]  # SD-2.x pads with "!" (id 0)
    sd1 = clip_tokenizer(pad_token="<|endoftext|>")
    assert sd1("effusion", padding="max_length", max_length=8)["input_ids"][4:] == [49407] * 4


def test_clip_positions_skip_specials_and_map_pieces(clip):
    sel = select_tokens(clip, "Small left pneumothorax.")
    # <start> small left pneu mo thor ax . <end>
    assert sel.positions == (1, 2, 3, 4, 5, 6, 7)
    assert sel.words == ("Small", "left", "pneumothorax", "pneumothorax", "pneumothorax", "pneumothorax", ".")
    only = select_tokens(clip, "Small left pneumothorax.", words=["Pneumothorax"])
    assert only.positions == (3, 4, 5, 6)


def test_multi_word_class_name(clip):
    sel = select_tokens(clip, "Moderate right pleural effusion", words=["Pleural Effusion"])
    assert set(sel.words) == {"pleural", "effusion"}
    assert len(sel.positions) == 4  # ple ural ef fusion


def test_class_word_absent_keeps_all_and_notes_it(clip):
    sel = select_tokens(clip, "Enlarged cardiac silhouette", words=["Cardiomegaly"])
    assert len(sel.positions) == len(select_tokens(clip, "Enlarged cardiac silhouette").positions)
    assert "all phrase tokens kept" in sel.warnings[0]


def test_wordpiece_positions(wordpiece):
    sel = select_tokens(wordpiece, "Left pneumothorax", max_length=16)
    assert sel.positions[0] == 1  # after [CLS]
    assert set(sel.words) == {"Left", "pneumothorax"}
    assert wordpiece.convert_ids_to_tokens(wordpiece("Left pneumothorax")["input_ids"])[-1] == "[SEP]"
    assert len(sel.positions) == len(wordpiece.tokenize("Left pneumothorax"))


def test_empty_phrase_is_error(clip):
    with pytest.raises(LdmGroundError, match="empty phrase"):
        select_tokens(clip, "   ")


def test_long_phrase_truncated_with_warning(clip):
    phrase = " ".join(["opacity"] * 100)
    with pytest.warns(UserWarning, match="truncated"):
        sel = select_tokens(clip, phrase)
    assert sel.truncated
    assert max(sel.positions) == 75  # 77 tokens: start + 75 + end
    assert "truncated" in sel.warnings[0]


def test_class_span_is_the_authors_rule(clip):
    """First to last matching position, the last one left out (the authors' slice)."""
    from ldmground.method.tokens import class_span

    # <s> small right ple ural ef fusion </s>: matches at 3..6 -> span 3, 4, 5 (not 6)
    assert class_span(clip, "Small right pleural effusion", "Pleural Effusion") == (3, 4, 5)
    # a class token again later stretches the span over the words between
    assert class_span(clip, "moderate cardiomegaly with effusion and cardiomegaly", "Cardiomegaly") == tuple(
        range(2, 13)
    )
    assert class_span(clip, "Large left effusion", "Pneumothorax") == ()  # no map then
    # one matching token: that token alone
    assert clip.tokenize("consolidation") == ["consolidation</w>"]
    assert class_span(clip, "New consolidation", "Consolidation") == (2,)


def test_ground_class_span_without_the_class_name_gives_no_map(tiny_pipe, xray):
    from ldmground.method.grounding import ground

    from .helpers import QUICK

    cfg = QUICK.replace(tokens="class-span")
    found, missing = ground(
        tiny_pipe, xray, ["right pleural effusion", "left opacity"], cfg, [["Pleural Effusion"]] * 2
    )
    assert np.isfinite(found.heatmap).any() and len(found.tokens.positions) == 3
    assert np.isnan(missing.heatmap).all() and "not in the phrase: no map" in missing.warnings[-1]
    [alone] = ground(tiny_pipe, xray, ["right pleural effusion"], cfg, [["Pleural Effusion"]])
    np.testing.assert_allclose(alone.heatmap, found.heatmap, atol=1e-5)  # the empty row changes nothing else
