"""Every knob of the grounding method, in one dataclass with named presets.

A :class:`GroundingConfig` is immutable and hashable; results record the config and its
:meth:`GroundingConfig.digest` so a rerun with the same settings can be recognised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Spacing = Literal["leading", "trailing", "linspace", "trailing-integer"]
TokenChoice = Literal["phrase", "class", "class-span"]
Pooling = Literal["mean", "max", "median"]
Resize = Literal["resize-crop", "crop-resize"]
BlurMode = Literal["reflect", "nearest"]
InversionStep = Literal["ddim", "lagged"]

# MS-CXR's eight finding categories, spelled as in its CSV (the phantom set's too,
# ``ldmground.datasets.phantom.anatomy.CATEGORIES``): the default reference phrases of ``contrast``.
FINDING_NAMES = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)
# Fields added after results were first stored: left out of ``to_dict`` (and so of the
# digest) while ``contrast`` is 0, so that earlier settings keep their digests.
_CONTRAST_FIELDS = ("contrast", "reference_phrases")
# Later fields, left out of ``to_dict`` while they hold the value that reproduces what
# ldmground computed before they existed (so those settings keep their digests; ``threads``
# changes only last bits, and the results store's key carries a version of its own).
_LEGACY_VALUES = {"resize": "crop-resize", "inversion_step": "ddim", "threads": 1, "blur_mode": "nearest"}


@dataclass(frozen=True)
class GroundingConfig:
    """Settings of DDIM-inversion cross-attention grounding.

    Attributes:
        num_inference_steps: number N of DDIM steps on the train-step grid.
        timestep_spacing: how the N steps are laid on the T train steps: diffusers' names,
            or ``"trailing-integer"``, the grid of the authors' patched ``set_timesteps``:
            t = T - 1 - k r with the integer ratio r = T // N, for every k with t >= 0 (334
            steps t = 999, 996, ..., 0 for N=300; t = 999, 989, ..., 9 for N=100). For N=300
            it walks the same t = 3 i as ``"leading"``; for N=100 they differ (10 i + 9 vs 10 i).
        window: ``(start, stop)`` fractions of N; attention is read at step indices
            ``[round(start N), round(stop N))`` of the ascending (inversion) order.
            The paper uses ``(0.4, 0.6)`` -> indices 120..179 for N=300.
        layers: cross-attention layer indices in the UNet's forward order
            (see :func:`ldmground.method.attention.cross_attention_layers`); ``None`` means all.
        tokens: ``"phrase"`` averages all tokens of the phrase (no start/end/padding);
            ``"class"`` keeps only the tokens of the words of the finding's class name, and
            all phrase tokens (with a note) when none occurs; ``"class-span"`` is the
            authors' attribution selection (:func:`ldmground.method.tokens.class_span`), and no map
            (all NaN) when the class name does not occur.
        normalize_maps: min-max normalise each (layer, timestep) map before pooling.
        pooling: how the (layer, timestep) maps are combined.
        sigma: Gaussian blur in pixels of a 512-px model input (scaled with the input size);
            0 disables it.
        blur_mode: how the blur extends the map past its border (``scipy.ndimage`` modes):
            ``"reflect"``, the authors' (``gaussian_filter``'s default), or ``"nearest"``
            (this project's before 0.2, and the demo preset's).
        otsu: binary Otsu threshold (multi-Otsu, 2 classes) and multiply by the mask.
        seed: seed for every random choice (none in the deterministic inversion path).
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast for the UNet.
        border: fraction of each image side set to the map's minimum before normalisation
            (0 disables); suppresses edge artefacts of small models.
        contrast: weight w of a phrase-independent background removed before
            post-processing: the aggregated map minus w times the mean aggregated map of
            ``reference_phrases``, read on the same inversion. 0 disables it (the paper's
            method); it is this project's extension, not the paper's.
        reference_phrases: the phrases whose mean map is the background (default: the
            eight MS-CXR finding names); unused when ``contrast`` is 0.
        resize: how the X-ray becomes the S x S model input.
            ``"resize-crop"`` (the authors'): short side resized to S with bilinear
            interpolation without antialiasing (torchvision's tensor ``Resize``, long side
            ``int(S * long / short)``), then a centre crop starting at ``floor(margin / 2)``
            (MONAI's ``CenterSpatialCrop``). ``"crop-resize"``: centre square of the original
            (at ``round(margin / 2)``), then PIL's antialiased bilinear resize to S; smoother
            for large downsampling factors, and what the demo model was tuned with.
        inversion_step: ``"ddim"`` evaluates the UNet at (x_t, t) and moves to the next
            level t' with the DDIM inverse step (MONAI GenerativeModels 0.2.3's
            ``reversed_step``, the committed code's). ``"lagged"`` reproduces the step that
            the authors' ``models_local/get_models.py`` defines but never binds: the UNet is
            evaluated at t on the latent still at the previous level t - r (the latent's x0
            and noise estimates use that level's alpha, 1 before the first step), and the step
            moves it to level t. Which one produced the paper's numbers cannot be told from
            the released code; ``"ddim"`` is what it runs.
        threads: torch's intra-op CPU threads while the image is grounded (restored after).
            Several CPU kernels (oneDNN convolutions on small feature maps among them) split
            their sums across threads, so the last bits of a heatmap depend on the thread
            count. A fixed count makes results bitwise identical across processes, shells
            and machines' loads; 1, the default, also across machines' core counts. ``None``
            leaves torch's setting alone (faster on many cores, not reproducible across thread
            counts). Use several processes (``evaluate --workers``) for speed instead.
    """

    num_inference_steps: int = 300
    timestep_spacing: Spacing = "trailing-integer"
    window: tuple[float, float] = (0.4, 0.6)
    layers: tuple[int, ...] | None = (3, 4, 6, 7)
    tokens: TokenChoice = "phrase"
    normalize_maps: bool = True
    pooling: Pooling = "mean"
    sigma: float = 2.5
    blur_mode: BlurMode = "reflect"
    otsu: bool = True
    seed: int = 0
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    border: float = 0.0
    contrast: float = 0.0
    reference_phrases: tuple[str, ...] = FINDING_NAMES
    resize: Resize = "resize-crop"
    inversion_step: InversionStep = "ddim"
    threads: int | None = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        start, stop = self.window
        if not 0.0 <= start < stop <= 1.0:
            raise ValueError(f"window must satisfy 0 <= start < stop <= 1, got {self.window}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(int(i) for i in self.layers))))
        refs = self.reference_phrases
        object.__setattr__(self, "reference_phrases", (refs,) if isinstance(refs, str) else tuple(refs))
        if self.resize not in ("resize-crop", "crop-resize"):
            raise ValueError(f"resize must be 'resize-crop' or 'crop-resize', got {self.resize!r}")
        if self.blur_mode not in ("reflect", "nearest"):
            raise ValueError(f"blur_mode must be 'reflect' or 'nearest', got {self.blur_mode!r}")
        if self.inversion_step not in ("ddim", "lagged"):
            raise ValueError(f"inversion_step must be 'ddim' or 'lagged', got {self.inversion_step!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.contrast < 0:
            raise ValueError(f"contrast must be >= 0, got {self.contrast}")
        if self.contrast > 0:
            if not self.reference_phrases:
                raise ValueError("contrast > 0 needs at least one reference phrase")
            blank = [p for p in self.reference_phrases if not isinstance(p, str) or not p.strip()]
            if blank:
                raise ValueError(f"reference_phrases must be non-empty text, got {blank!r}")

    def window_indices(self) -> range:
        """Step indices (ascending inversion order) whose attention is read."""
        n = self.num_inference_steps
        start = int(round(self.window[0] * n))
        stop = max(start + 1, int(round(self.window[1] * n)))
        return range(start, min(stop, n))

    def replace(self, **changes: Any) -> GroundingConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["window"] = list(self.window)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["reference_phrases"] = list(self.reference_phrases)
        if self.contrast == 0:
            for name in _CONTRAST_FIELDS:
                d.pop(name)
        for name, legacy in _LEGACY_VALUES.items():
            if d[name] == legacy:
                d.pop(name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroundingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GroundingConfig field(s): {sorted(unknown)}")
        d = dict(d)
        if "window" in d:
            d["window"] = tuple(d["window"])
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        if "reference_phrases" in d:
            d["reference_phrases"] = tuple(d["reference_phrases"])
        return cls(**d)

    def digest(self) -> str:
        """Short stable hash of the settings (12 hex digits)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


PRESETS: dict[str, GroundingConfig] = {
    # Vilouras et al.: 300 steps on the authors' t = 3i grid, middle 20 % of the steps,
    # the four 16x16 cross-attention layers, blur 2.5 px at 512, Otsu; the authors'
    # resize-then-crop and DDIM inverse step.
    "paper": GroundingConfig(),
    # The same recipe on 50 steps: a quick look, not the paper's numbers.
    "fast": GroundingConfig(num_inference_steps=50),
    # The authors' re-run of the method as the "LDM (frozen)" baseline of their follow-up
    # (Vilouras et al., MIDL 2026, Table 1): 100 steps, window [0.4, 0.6) -> step indices
    # 40..59, on the authors' grid t = 10 k + 9 -> t = 409..599; everything else as ``paper``.
    "midl26": GroundingConfig(num_inference_steps=100),
    # Settings for the phantom demo model, chosen on a 120-sample validation split (seed 1,
    # never the committed test split) by ldmground.demo.selection.select_demo_preset, as the best
    # pointing + CNR among the settings with Otsu (without it mIoU has no mask to score): its
    # three 8x8 cross-attention layers, steps 2..11 of 25, 0.8 x the eight finding names' mean
    # map subtracted (not in the paper), blur 32 px at 512 (4 px of its 64-px input), Otsu.
    "demo": GroundingConfig(
        num_inference_steps=25,
        timestep_spacing="leading",
        window=(0.1, 0.5),
        layers=(1, 2, 3),
        sigma=32.0,
        otsu=True,
        contrast=0.8,
        resize="crop-resize",
        blur_mode="nearest",
    ),
}


def get_preset(name: str) -> GroundingConfig:
    """Return the named preset; a clear error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
