"""Which token positions of the text encoder's input belong to a phrase (or to some words).

Works with any Hugging Face *fast* tokenizer (CLIP BPE, BERT WordPiece, ...): character
offsets map every sub-word piece back to the word it came from, so "pneumothorax" (four CLIP
pieces) is one word with four positions. Start/end tokens and padding are never selected.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

from ..errors import LdmGroundError

_WORD = re.compile(r"[\w]+(?:[-'][\w]+)*", re.UNICODE)


@dataclass(frozen=True)
class TokenSelection:
    """Token positions chosen for one phrase.

    Attributes:
        positions: indices into the encoder's (padded) input sequence, ascending.
        words: for each position, the phrase word the piece belongs to.
        pieces: for each position, the tokenizer's piece string.
        truncated: True when the phrase did not fit the encoder and was cut.
        warnings: human-readable notes to store with the result (e.g. truncation).
    """

    positions: tuple[int, ...]
    words: tuple[str, ...]
    pieces: tuple[str, ...]
    truncated: bool = False
    warnings: tuple[str, ...] = field(default=())


def _words_with_spans(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text)]


def select_tokens(
    tokenizer, phrase: str, words: list[str] | tuple[str, ...] | None = None, max_length: int | None = None
) -> TokenSelection:
    """Token positions of ``phrase`` as the text encoder sees it.

    Args:
        tokenizer: a Hugging Face fast tokenizer (``return_offsets_mapping`` support).
        phrase: the report phrase. Empty or whitespace-only phrases are an error.
        words: optional restriction: keep only the pieces of these words (case-insensitive;
            a multi-word entry such as ``"pleural effusion"`` matches each of its words).
            When none of them occurs in the phrase, all phrase tokens are kept and a warning
            is recorded.
        max_length: the encoder's token limit (default ``tokenizer.model_max_length``).
            Longer phrases are truncated with a warning.

    Returns:
        A :class:`TokenSelection` whose positions index the padded input ids.
    """
    if not isinstance(phrase, str) or not phrase.strip():
        raise LdmGroundError("empty phrase: give the report sentence to ground (field 'label_text')")
    if not getattr(tokenizer, "is_fast", False):
        raise LdmGroundError(
            f"{type(tokenizer).__name__} is a slow tokenizer; load the fast one (AutoTokenizer with use_fast=True)"
        )
    max_length = int(max_length or tokenizer.model_max_length)
    full = tokenizer(phrase, add_special_tokens=True, truncation=False)["input_ids"]
    enc = tokenizer(
        phrase, add_special_tokens=True, truncation=True, max_length=max_length, return_offsets_mapping=True
    )
    notes: list[str] = []
    truncated = len(full) > max_length
    if truncated:
        msg = f"phrase has {len(full)} tokens, more than the encoder's {max_length}; truncated"
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)

    special = set(tokenizer.all_special_ids)
    spans = _words_with_spans(phrase)
    positions, piece_words, pieces = [], [], []
    for pos, (tok_id, (start, end)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
        if tok_id in special or end <= start:
            continue
        word = next((w for w, s, e in spans if s <= start < e), phrase[start:end])
        positions.append(pos)
        piece_words.append(word)
        pieces.append(tokenizer.convert_ids_to_tokens(tok_id))
    if not positions:
        raise LdmGroundError(f"phrase {phrase!r} has no tokens the encoder can attend to")

    if words:
        wanted = {w.lower() for entry in words for w, _, _ in _words_with_spans(entry)}
        keep = [i for i, w in enumerate(piece_words) if w.lower() in wanted]
        if keep:
            positions = [positions[i] for i in keep]
            piece_words = [piece_words[i] for i in keep]
            pieces = [pieces[i] for i in keep]
        else:
            notes.append(f"none of {sorted(wanted)} occurs in the phrase; all phrase tokens kept")

    return TokenSelection(tuple(positions), tuple(piece_words), tuple(pieces), truncated, tuple(notes))


def class_span(tokenizer, phrase: str, class_name: str, max_length: int | None = None) -> tuple[int, ...]:
    """Token positions of the authors' attribution experiment (``sampler.py``, Table III).

    Their rule, kept as it is: the phrase's positions whose token id equals any token id of
    ``class_name`` (start/end tokens left out) are found; the span runs from the first of
    them up to, but not including, the last (one position when first == last). So for a
    class name of several tokens the last token is left out, and a class token that occurs
    again later in the phrase stretches the span. An empty tuple when no class token occurs
    (the authors' code then returns an all-NaN map).
    """
    max_length = int(max_length or tokenizer.model_max_length)
    ids = tokenizer(phrase, truncation=True, max_length=max_length)["input_ids"]
    special = set(tokenizer.all_special_ids)
    wanted = {i for i in tokenizer(class_name)["input_ids"] if i not in special}
    hits = [pos for pos, i in enumerate(ids) if i in wanted]
    if not hits:
        return ()
    first, last = hits[0], hits[-1]
    return tuple(range(first, last if last > first else first + 1))


_SIDE_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def swap_sides(phrase: str) -> str:
    """The phrase with the words left/right exchanged ("left-sided" -> "right-sided")."""
    return re.sub(r"\b(left|right|Left|Right|LEFT|RIGHT)\b", lambda m: _SIDE_SWAP[m.group(1)], phrase)
