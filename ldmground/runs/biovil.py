"""BioViL and BioViL-T as grounders: preprocessing, the patch-text similarity map brought back
to the original image, and grounders from a weights folder or the Hub cache. The networks
are in :mod:`ldmground.models.biovil`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LdmGroundError
from ..models.biovil import (
    RESIZE,
    SMOOTH_SIGMA,
    VARIANTS,
    BiovilImageModel,
    CxrBertTextModel,
    _fetch,
    _load_tensors,
    bert_tokenizer,
    build_biovil_networks,
    load_image_state,
    load_text_state,
    toy_vocab,
    variant,
)
from .grounders import Grounder, Heatmaps

# --- image preprocessing and the map back to the image ---------------------------------------


def remap_to_uint8(image: np.ndarray) -> np.ndarray:
    """hi-ml's ``load_image`` intensity step on an ldmground image: min-max to [0, 255], cut to uint8.

    ``image`` is :func:`ldmground.method.heatmap.load_image`'s float32 in [0, 1]. Where it came from
    8- or 16-bit integers (k / 255 or k / 65535), those integers are recovered first, so the
    float64 arithmetic (subtract min, divide by max, times 255, truncate) runs on the same
    numbers as hi-ml's on the file's pixels.
    """
    arr = np.asarray(image, dtype=np.float64)
    for scale, tol in ((255.0, 1e-3), (65535.0, 1e-2)):
        scaled = arr * scale
        ints = np.rint(scaled)
        if np.all(np.abs(scaled - ints) < tol):
            arr = ints
            break
    arr = arr - arr.min()
    top = arr.max()
    if top > 0:
        arr /= top
    arr *= 255
    return arr.astype(np.uint8)


def resized_size(width: int, height: int, size: int = RESIZE) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output (W, H): short side ``size``, long side truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_origin(width: int, height: int, crop: int) -> tuple[int, int]:
    """torchvision ``CenterCrop(crop)`` top-left (left, top): ``int(round(margin / 2))``."""
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def preprocess(image: np.ndarray, crop_size: int, resize: int = RESIZE) -> torch.Tensor:
    """hi-ml's ``create_chest_xray_transform_for_inference(resize, crop)`` on an ldmground image:
    (H, W) float in [0, 1] -> (1, 3, crop, crop) float32 in [0, 1]."""
    from PIL import Image

    if image.ndim != 2:
        raise LdmGroundError(f"expected a 2-D grayscale image, got shape {image.shape}")
    if crop_size > resize:
        raise LdmGroundError(f"crop {crop_size} larger than resize {resize}")
    pil = Image.fromarray(remap_to_uint8(image))  # uint8 (H, W): mode "L"
    w, h = pil.size
    size = resized_size(w, h, resize)
    if size != (w, h):
        pil = pil.resize(size, Image.BILINEAR)
    left, top = crop_origin(*size, crop_size)
    pil = pil.crop((left, top, left + crop_size, top + crop_size))
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)
    return x[None, None].expand(1, 3, -1, -1).contiguous()


def similarity_grid(patches: torch.Tensor, text: torch.Tensor, sigma: float = SMOOTH_SIGMA) -> torch.Tensor:
    """Cosine similarity of (h, w, D) normalised patch embeddings with a (D,) normalised text
    embedding, Gaussian-smoothed over the grid (scipy, ``sigma`` in patches; 0: none)."""
    from scipy import ndimage

    h, w, d = patches.shape
    sim = (patches.reshape(-1, d) @ text.reshape(d, 1)).reshape(h, w).float().cpu().numpy()
    if sigma > 0:
        sim = ndimage.gaussian_filter(sim, sigma=(sigma, sigma), order=0)
    return torch.from_numpy(np.ascontiguousarray(sim))


def grid_to_original(grid: torch.Tensor, width: int, height: int, crop_size: int, resize: int = RESIZE) -> np.ndarray:
    """hi-ml's ``convert_similarity_to_image_size`` (nearest): the grid upsampled to the crop's
    size in original pixels, ``int(crop * short / resize)``, centred by NaN padding
    (floor left/top, ceil right/bottom) to (height, width)."""
    side = int(crop_size * min(width, height) / resize)
    up = F.interpolate(grid[None, None].float(), size=(side, side), mode="nearest")[0, 0]
    mw, mh = width - side, height - side
    pad = (math.floor(mw / 2), math.ceil(mw / 2), math.floor(mh / 2), math.ceil(mh / 2))
    return F.pad(up, pad, value=float("nan")).numpy()


def clamp_at_zero(heatmap: np.ndarray) -> np.ndarray:
    """The authors' ``sim_map.clamp(min=0)``; NaN stays NaN."""
    return torch.from_numpy(heatmap).clamp(min=0).numpy()


# --- the grounder ----------------------------------------------------------------------------


class BiovilGrounder(Grounder):
    """BioViL / BioViL-T similarity maps as ``eval_biovil_t.py`` computes them."""

    def __init__(
        self,
        kind: str,
        image_model: BiovilImageModel,
        text_model: CxrBertTextModel,
        tokenizer,
        spec: str | None = None,
        weight_files: Sequence[Path] = (),
        device: str | torch.device | None = None,
    ):
        self.variant = variant(kind)
        self.spec = spec or kind
        self.image_size = self.variant.crop_size
        self.weight_files = tuple(weight_files)
        self.device = torch.device(device or "cpu")
        self.image_model = image_model.eval().to(self.device)
        self.text_model = text_model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.sigma = SMOOTH_SIGMA
        dims = (
            image_model.projector.model[3].out_channels,
            text_model.cls_projection_head.dense_to_output.out_features,
        )
        if dims[0] != dims[1]:
            raise LdmGroundError(f"image and text embeddings differ in size: {dims[0]} vs {dims[1]}")

    # text ----------------------------------------------------------------------------------
    def _token_ids(self, phrase: str) -> list[int]:
        special = [t for t in self.tokenizer.all_special_tokens if t != self.tokenizer.mask_token]
        found = [t for t in special if t in phrase]
        if found:
            raise LdmGroundError(f"phrase {phrase!r} contains the special token(s) {found}")
        ids = self.tokenizer(phrase.rstrip("!?."), add_special_tokens=True)["input_ids"]
        if len(ids) > self.text_model.max_length:
            raise LdmGroundError(
                f"phrase has {len(ids)} tokens, more than the text model's {self.text_model.max_length}"
            )
        return ids

    def check_phrase(self, phrase: str) -> list[str]:
        notes = super().check_phrase(phrase)
        self._token_ids(phrase)
        return notes

    def text_embedding(self, phrase: str) -> torch.Tensor:
        """(D,) normalised projected [CLS] embedding of one phrase (one at a time, no padding)."""
        ids = torch.tensor([self._token_ids(phrase)], device=self.device)
        return self.text_model.embed(ids, torch.ones_like(ids))[0]

    # image ---------------------------------------------------------------------------------
    def patch_embeddings(self, image: np.ndarray) -> torch.Tensor:
        """(h, w, D) normalised projected patch embeddings of the preprocessed image."""
        x = preprocess(image, self.variant.crop_size).to(self.device)
        return self.image_model.patch_embeddings(x)[0]

    def heatmap(self, patches: torch.Tensor, text: torch.Tensor, width: int, height: int) -> np.ndarray:
        """Smoothed cosine map -> (height, width) original frame, NaN outside the crop, >= 0."""
        grid = similarity_grid(patches, text, self.sigma)
        return clamp_at_zero(grid_to_original(grid, width, height, self.variant.crop_size))

    def __call__(self, image: np.ndarray, phrases: list[str], words: list[list[str]]) -> Heatmaps:
        """One map per phrase (the whole phrase, as the authors do: ``words`` is not used)."""
        if image.ndim != 2:
            raise LdmGroundError(f"expected a 2-D grayscale image, got shape {image.shape}")
        height, width = image.shape
        patches = self.patch_embeddings(image)
        maps = [self.heatmap(patches, self.text_embedding(p), width, height) for p in phrases]
        return Heatmaps(maps, 0, [[] for _ in phrases])


def random_biovil_grounder(kind: str, small: bool = True, seed: int = 0, device=None) -> BiovilGrounder:
    """A grounder with random weights and a toy vocabulary: offline tests and smoke runs."""
    vocab = toy_vocab()
    image, text = build_biovil_networks(kind, small=small, seed=seed, vocab_size=len(vocab))
    return BiovilGrounder(kind, image, text, bert_tokenizer(vocab), spec=f"{kind}:random", device=device)


def make_biovil_grounder(kind: str, weights: str | None = None, device=None) -> BiovilGrounder:
    """BioViL (``kind="biovil"``) or BioViL-T (``"biovil-t"``) grounder.

    Args:
        weights: None: the Hub repo (or its local cache) at hi-ml-multimodal's revision;
            a folder with that repo's files; ``"random"``: full-size networks with random
            weights and a toy vocabulary (smoke runs, no download).
        device: torch device (default: CPU).
    """
    v = variant(kind)
    if weights == "random":
        return random_biovil_grounder(kind, small=False, device=device)
    files = _fetch(v, weights)
    config = json.loads(files["config.json"].read_text())
    tok_cfg = None
    if files.get("tokenizer_config.json") is not None and files["tokenizer_config.json"].is_file():
        tok_cfg = json.loads(files["tokenizer_config.json"].read_text())
    image = BiovilImageModel(v.multi_image)
    load_image_state(image, _load_tensors(files[v.image_weights]), str(files[v.image_weights]))
    text = CxrBertTextModel(config)
    load_text_state(text, _load_tensors(files["text"]), str(files["text"]))
    spec = kind if weights is None else f"{kind}:{weights}"
    used = [files[v.image_weights], files["text"], files["vocab.txt"], files["config.json"]]
    return BiovilGrounder(kind, image, text, bert_tokenizer(files["vocab.txt"], tok_cfg), spec, used, device)


def parse_biovil_spec(spec: str) -> tuple[str, str | None] | None:
    """``"biovil"``, ``"biovil-t"``, ``"biovil:<folder>"``, ``"biovil-t:random"``, ... ->
    (kind, weights); None for a spec that is not a BioViL one."""
    kind, _, weights = spec.partition(":")
    if kind not in VARIANTS:
        return None
    return kind, (weights or None)


def grounder_from_spec(spec: str, device=None) -> BiovilGrounder:
    parsed = parse_biovil_spec(spec)
    if parsed is None:
        raise LdmGroundError(f"{spec!r} is not a BioViL model spec")
    return make_biovil_grounder(*parsed, device=device)
