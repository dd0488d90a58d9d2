"""Rendering a phantom X-ray (pose, elastic warp, exposure, noise), its boxes, and writing a
split in MS-CXR's schema.
"""

from __future__ import annotations

import textwrap
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .anatomy import CATEGORIES, MSCXR_COLUMNS, Finding, _base_maps, _pick, _smooth_noise
from .findings import _CENTRAL, _RENDERERS

# --------------------------------------------------------------------------------------
# Pose + elastic warp, intensity
# --------------------------------------------------------------------------------------


def _warp_grid(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sampling grid (2, n, n): output pixel -> canonical (row, col).

    Composition of a small similarity-like pose (rotation +-4 deg, scale 0.92-1.06 with
    +-3 % anisotropy, shift +-4 % of the size) and a smooth elastic displacement
    (~3 % of the size, correlation length ~1/4 of the image), so that the lungs, heart and
    diaphragm differ in shape from image to image.
    """
    ang = np.deg2rad(rng.uniform(-4.0, 4.0))
    s = rng.uniform(0.92, 1.06)
    sr, sc = s * rng.uniform(0.97, 1.03), s * rng.uniform(0.97, 1.03)
    shift = rng.uniform(-0.04, 0.04, size=2) * n
    r, c = np.mgrid[0:n, 0:n].astype(np.float32)
    ctr = (n - 1) / 2.0
    y, x = r - ctr - shift[0], c - ctr - shift[1]
    ca, sa = np.cos(ang), np.sin(ang)
    src_r = (ca * y - sa * x) / sr + ctr
    src_c = (sa * y + ca * x) / sc + ctr
    amp = rng.uniform(0.015, 0.035) * n
    src_r += amp * _smooth_noise(rng, n, 4)
    src_c += amp * _smooth_noise(rng, n, 4)
    return np.stack([src_r, src_c])


def _to_uint8(rng: np.random.Generator, L: np.ndarray) -> np.ndarray:
    """Line integral (mm water) -> 8-bit film-like image with exposure / noise jitter.

    1 - exp(-k L) with a small k is nearly the log-domain (linear in L) signal a CR/DR
    chain displays, slightly compressed at the dense end (abdomen, spine). The window
    runs from a low quantile (lungs dark) to a high one (bones / heart bright), like the
    automatic windowing of clinical processing.
    """
    k = 0.004 * rng.uniform(0.8, 1.2)  # effective attenuation per mm water (exposure)
    img = 1.0 - np.exp(-k * L)
    lo, hi = np.quantile(img, [0.06, 0.995])
    span = hi - lo
    lo += span * rng.uniform(-0.1, 0.05)
    hi += span * rng.uniform(-0.05, 0.05)
    img = np.clip((img - lo) / (hi - lo), 0.0, 1.0) ** rng.uniform(1.0, 1.3)
    img = ndi.gaussian_filter(img, rng.uniform(0.3, 0.8))
    img = img + rng.normal(0.0, rng.uniform(0.004, 0.012), size=img.shape)
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    r0, r1 = np.nonzero(rows)[0][[0, -1]]
    c0, c1 = np.nonzero(cols)[0][[0, -1]]
    return int(c0), int(r0), int(c1 - c0 + 1), int(r1 - r0 + 1)


def _choose_findings(
    rng: np.random.Generator, k: int, first: str | None, cats: list[str] | None = None
) -> list[tuple[str, str]]:
    """k distinct categories (or the given `cats`) with patient sides.

    Lateral findings go on different sides when possible, so that with two findings per
    image the phrase's side word decides which finding it grounds.
    """
    if cats is None:
        cats = [first] if first else []
        rest = [c for c in CATEGORIES if c not in cats]
        while len(cats) < k:
            cats.append(rest.pop(int(rng.integers(len(rest)))))
    unknown = set(cats) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}")
    used: list[str] = []
    out = []
    for cat in cats:
        if cat in _CENTRAL:
            out.append((cat, ""))
            continue
        free = [s for s in ("left", "right") if s not in used]
        side = _pick(rng, free) if free else _pick(rng, ["left", "right"])
        used.append(side)
        out.append((cat, side))
    return out


def render_sample(
    rng: np.random.Generator,
    size: int = 256,
    findings_per_image: int = 1,
    categories: list[str] | None = None,
    first_category: str | None = None,
) -> tuple[np.ndarray, list[Finding]]:
    """Render one phantom chest X-ray with its findings (the function training code uses).

    Args:
        rng: numpy Generator; all randomness of the image comes from it.
        size: output side length in pixels (>= 64; 256 default).
        findings_per_image: number of distinct findings (1..8); several findings are of
            different categories and lateral ones are put on different sides when possible.
        categories: explicit list of categories (overrides findings_per_image / first).
        first_category: category of the first finding (the others are drawn at random).

    Returns:
        image: (size, size) uint8 grayscale, radiological convention (patient's right on
            the image left).
        findings: list of ``Finding`` with ``category``, ``phrase``, ``side`` (patient
            side), ``boxes`` [(x, y, w, h) ints, pixels], ``mask`` (size, size) bool and
            ``part_masks`` (one bool mask per box).
    """
    if size < 64:
        raise ValueError("size must be >= 64")
    b = _base_maps(int(size))
    if categories is not None:
        chosen = _choose_findings(rng, len(categories), None, list(categories))
    else:
        if not 1 <= findings_per_image <= len(CATEGORIES):
            raise ValueError("findings_per_image must be in 1..8")
        chosen = _choose_findings(rng, findings_per_image, first_category)
    inserts = [_RENDERERS[cat](b, rng, side) for cat, side in chosen]
    L = b.L + sum(ins.dL for ins in inserts)
    # a mild global soft-tissue factor: body habitus differs between patients
    L = L * rng.uniform(0.9, 1.1)
    for _attempt in range(8):
        grid = _warp_grid(rng, size)
        warped = ndi.map_coordinates(L, grid, order=1, mode="nearest")
        findings: list[Finding] = []
        ok = True
        for ins in inserts:
            parts = [ndi.map_coordinates(p, grid, order=1, mode="constant") > 0.5 for p in ins.parts]
            boxes = [_bbox(m) for m in parts]
            # a part pushed (almost) out of the field of view: draw another pose
            if any(bx is None or bx[2] * bx[3] < 16 for bx in boxes):
                ok = False
                break
            findings.append(
                Finding(
                    ins.category,
                    ins.phrase,
                    ins.side,
                    boxes,  # type: ignore[arg-type]
                    np.logical_or.reduce(parts),
                    parts,
                )
            )
        if ok:
            break
    else:  # pragma: no cover - 8 bad poses in a row does not happen with these ranges
        raise RuntimeError("could not place the findings inside the image")
    return _to_uint8(rng, warped), findings


# --------------------------------------------------------------------------------------
# Writing a split, plotting
# --------------------------------------------------------------------------------------


def _image_rng(seed: int, index: int, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), zlib.crc32(split.encode("utf-8"))])


def generate_phantom(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    split: str = "test",
    size: int = 256,
    findings_per_image: int = 1,
    progress: bool = True,
) -> pd.DataFrame:
    """Render n phantom chest X-rays and write them in MS-CXR's layout.

    Image ``index``'s first finding has category ``CATEGORIES[index % 8]`` (so the
    categories are balanced); everything else is drawn from
    ``default_rng([seed, index, crc32(split)])``.

    Args:
        out_dir: output folder; PNGs go to ``out_dir/images/<dicom_id>.png``.
        n: number of images.
        seed: seed of the split (same seed -> byte-identical PNGs and CSV).
        split: split name, written in the ``split`` column and the CSV name.
        size: image side in pixels.
        findings_per_image: findings per image (distinct categories, each its own phrase).
        progress: show a tqdm progress bar.

    Returns:
        DataFrame with columns ``MSCXR_COLUMNS`` (one row per box; rows sharing
        (path, label_text) are one sample), also written to ``out_dir/<split>.csv``.
        ``path`` is relative to ``out_dir``; dicom_id is ``phantom-<split>-<index:05d>``.
    """
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    it = range(int(n))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"phantom {split}", unit="img")
    rows = []
    for idx in it:
        dicom_id = f"phantom-{split}-{idx:05d}"
        rel = f"images/{dicom_id}.png"
        img, findings = render_sample(
            _image_rng(seed, idx, split),
            size,
            findings_per_image,
            first_category=CATEGORIES[idx % len(CATEGORIES)],
        )
        # fixed PNG options, no metadata -> byte-identical files for identical pixels
        Image.fromarray(img, mode="L").save(out / rel, format="PNG", optimize=False, compress_level=9)
        for f in findings:
            for x, y, w, h in f.boxes:
                rows.append((dicom_id, f.category, f.phrase, rel, x, y, w, h, size, size, split))
    df = pd.DataFrame(rows, columns=MSCXR_COLUMNS)
    df.to_csv(out / f"{split}.csv", index=False, lineterminator="\n")
    return df


def plot_samples(df: pd.DataFrame, root: str | Path, n: int = 16, ncols: int = 4):
    """Grid of samples with their boxes and phrases, spread across categories.

    Args:
        df: MS-CXR-style DataFrame (as returned by ``generate_phantom``).
        root: folder the ``path`` column is relative to.
        n: number of samples (one (path, label_text) pair each), chosen round-robin over
            the categories present, in order of appearance.
        ncols: grid columns.

    Returns:
        matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    groups = list(df.groupby(["path", "label_text"], sort=False))
    by_cat: dict[str, list] = {}
    for key, g in groups:
        by_cat.setdefault(str(g["category_name"].iloc[0]), []).append((key, g))
    picked = []
    while len(picked) < min(n, len(groups)):
        for cat in sorted(by_cat):
            if by_cat[cat] and len(picked) < n:
                picked.append(by_cat[cat].pop(0))
    nrows = int(np.ceil(len(picked) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.55 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, ((path, text), g) in zip(axes.ravel(), picked, strict=False):
        img = np.asarray(Image.open(Path(root) / path))
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        for _, row in g.iterrows():
            ax.add_patch(
                Rectangle((row.x - 0.5, row.y - 0.5), row.w, row.h, fill=False, edgecolor="#ffb000", linewidth=1.6)
            )
        ax.set_title(f"{g['category_name'].iloc[0]}\n" + textwrap.fill(str(text), 34), fontsize=9.5)
        ax.text(4, img.shape[0] - 6, "R", color="w", fontsize=9, fontweight="bold")
    fig.suptitle("Phantom chest X-rays (patient's right = image left, 'R' marker)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    return fig
