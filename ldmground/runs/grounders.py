"""Grounders: anything that turns (image, phrases) into heatmaps on the original image.

:class:`Grounder` is the interface batch evaluation calls; :class:`DiffusionGrounder` is the
method, :class:`CentrePriorGrounder` the centre-prior baseline (the BioViL baselines live in
:mod:`ldmground.models.biovil`). :func:`ldmground.runs.evaluation.make_grounder` builds one from a spec.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import GroundingConfig
from ..errors import LdmGroundError
from ..method.heatmap import preprocess
from .baselines import centre_prior


@dataclass
class Heatmaps:
    """Heatmaps of the phrases of one image, original frame, plus cost figures."""

    maps: list[np.ndarray]
    unet_evals: int = 0
    notes: list[list[str]] = field(default_factory=list)
    image_notes: list[str] = field(default_factory=list)  # warnings raised while grounding the image


class Grounder:
    """Interface: ``spec`` and ``__call__(image, phrases, words) -> Heatmaps``.

    :meth:`ground_batch` grounds several images; grounders whose results depend on how
    images are batched (``batches_images``) say so, and batch evaluation then keys their
    results by the batch size.
    """

    spec: str = ""
    image_size: int = 512
    weight_files: Sequence[Path] = ()
    batches_images: bool = False

    @functools.cached_property
    def weights_sha256(self) -> dict[str, str]:
        """``folder/file`` -> SHA-256 of every weights file (read once per grounder)."""
        from ..models.folder import sha256_file

        return {f"{Path(p).parent.name}/{Path(p).name}": sha256_file(p) for p in self.weight_files}

    @property
    def weights_digest(self) -> str:
        """12 hex digits over :attr:`weights_sha256`; "" when there are no weights files."""
        if not self.weights_sha256:
            return ""
        lines = sorted(f"{name} {sha}" for name, sha in self.weights_sha256.items())
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]

    def check_phrase(self, phrase: str) -> list[str]:
        """Raise :class:`LdmGroundError` for a phrase this grounder cannot use; return notes."""
        if not phrase.strip():
            raise LdmGroundError("empty phrase")
        return []

    def __call__(self, image: np.ndarray, phrases: list[str], words: list[list[str]]) -> Heatmaps:
        raise NotImplementedError

    def default_batch_images(self) -> int:
        """Images per :meth:`ground_batch` call when none is asked for."""
        return 1

    def ground_batch(
        self, items: Sequence[tuple[np.ndarray, list[str], list[list[str]]]]
    ) -> list[Heatmaps | Exception]:
        """Heatmaps of several ``(image, phrases, words)``; an image whose grounding raises
        gets its exception in its place. This default grounds them one by one; the warnings
        each raises are kept in its ``Heatmaps.image_notes``."""
        out: list[Heatmaps | Exception] = []
        for image, phrases, words in items:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    maps = self(image, phrases, words)
                except Exception as err:
                    out.append(err)
                    continue
            maps.image_notes = [*maps.image_notes, *(str(w.message) for w in caught)]
            out.append(maps)
        return out


class CentrePriorGrounder(Grounder):
    """Baseline ``centre-prior``: the same Gaussian at the centre of every image."""

    def __init__(self, image_size: int = 512):
        self.spec, self.image_size = "centre-prior", image_size

    def __call__(self, image, phrases, words):
        _, geo = preprocess(image, self.image_size)
        hm = geo.to_original(centre_prior(geo))
        return Heatmaps([hm.copy() for _ in phrases], 0, [[] for _ in phrases])


class DiffusionGrounder(Grounder):
    """The method: DDIM inversion + cross-attention of a :class:`GroundingPipeline`.

    ``cache``: an optional :class:`~ldmground.method.trajectory.TrajectoryCache` shared by its
    calls (an image seen before is not inverted again).
    """

    batches_images = True

    def __init__(self, pipe, config: GroundingConfig, cache=None):
        from ..method.grounding import resolve_config

        self.pipe, self.config = pipe, resolve_config(config, pipe)  # layers checked before any compute
        self.spec, self.image_size = pipe.spec, pipe.image_size
        self.device = pipe.device
        self.weight_files = pipe.weight_files
        self.cache = cache

    def default_batch_images(self) -> int:
        from ..method.batch_size import default_batch_size

        return default_batch_size(self.pipe, self.config)

    def ground_batch(self, items):
        """All images in one batch (:func:`ldmground.method.grounding.ground_many`); a bad image
        fails alone."""
        from ..method.grounding import ground_many

        results = ground_many(
            self.pipe, list(items), self.config, batch_size=max(1, len(items)), cache=self.cache, return_exceptions=True
        )
        return [r if isinstance(r, Exception) else _heatmaps(r) for r in results]

    def check_phrase(self, phrase: str) -> list[str]:
        from ..method.tokens import select_tokens

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(select_tokens(self.pipe.tokenizer, phrase, None, self.pipe.max_length).warnings)

    def __call__(self, image, phrases, words):
        from ..method.grounding import ground

        # No "ignore" filter here: _ground_image records the warnings (e.g. "smaller than
        # the model input") and keeps the notes; truncation comes back in r.warnings.
        return _heatmaps(ground(self.pipe, image, phrases, self.config, words, cache=self.cache))


def _heatmaps(results) -> Heatmaps:
    """The :class:`Heatmaps` of one image's :class:`~ldmground.method.grounding.GroundingResult` list."""
    return Heatmaps(
        [r.heatmap for r in results], results[0].unet_evals, [r.warnings for r in results], results[0].image_warnings
    )
