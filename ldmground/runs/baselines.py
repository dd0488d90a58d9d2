"""Heatmaps that need no diffusion model: reference points for every metric."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..geometry import Geometry


def centre_prior(geometry: Geometry, sigma_fraction: float = 0.25) -> np.ndarray:
    """An isotropic Gaussian at the centre of the model frame, in the model frame.

    Args:
        geometry: the image's :class:`Geometry` (the prior lives in its S x S crop).
        sigma_fraction: standard deviation as a fraction of S.
    Returns:
        (S, S) float32 in [0, 1].
    """
    s = geometry.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    c = (s - 1) / 2
    g = np.exp(-((xx - c) ** 2 + (yy - c) ** 2) / (2 * (sigma_fraction * s) ** 2))
    return (g / g.max()).astype(np.float32)


def oracle_boxes(geometry: Geometry, boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """An upper reference: 1 inside the true boxes (model frame), 0 elsewhere."""
    from ..metrics import union_mask

    return union_mask((geometry.size, geometry.size), geometry.boxes_to_model(boxes)).astype(np.float32)


def oracle_at(geometry: Geometry, boxes: Sequence[Sequence[float]], side: int) -> np.ndarray:
    """The box oracle as a ``side`` x ``side`` attention layer could draw it at best.

    :func:`oracle_boxes` averaged over ``side`` x ``side`` cells, then bilinearly upsampled to
    the model frame as every attention map is: scored like a heatmap, it gives the
    ceiling that a layer's resolution alone puts on each metric.
    """
    import torch
    import torch.nn.functional as F

    from ..method.attention import upsample_map

    exact = torch.from_numpy(oracle_boxes(geometry, boxes))
    cells = F.adaptive_avg_pool2d(exact[None, None], side)[0, 0]
    return upsample_map(cells, tuple(exact.shape)).numpy()
