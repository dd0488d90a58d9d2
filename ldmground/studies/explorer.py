"""An ipywidgets explorer: one sample, one phrase, every knob of the aggregation live.

The attention of all layers at every step is recorded once per (image, phrase) with
:func:`ldmground.method.grounding.attention_cache` and kept; moving a slider only re-aggregates
(:func:`ldmground.studies.cache.heatmap_from_cache`) and re-scores, well under a second for a
64-px model. Usable headless: set ``ex.widgets[name].value`` and read ``ex.last_heatmap``,
``ex.last_metrics``; ``ex.unet_runs`` counts the inversions made so far.

Example (in a notebook)::

    from ldmground.studies.explorer import Explorer
    ex = Explorer(pipe, samples, "data/phantom", "demo")
    ex   # displays the controls, the overlay and the metrics
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GroundingConfig
from ..datasets.mscxr import Sample
from ..method.heatmap import load_image
from ..metrics import all_metrics
from .cache import CachedSample, as_config, class_token_indices, full_window, heatmap_from_cache
from .overlay import overlay

SHOWN_METRICS = ["cnr", "miou", "auc_roc", "pointing"]


class Explorer:
    """Interactive grounding of one sample at a time.

    Args:
        pipe: a :class:`~ldmground.models.pipeline.GroundingPipeline`.
        samples: the pairs to choose from (boxes give the metrics).
        images: the folder the samples' ``path`` is relative to.
        config: the starting settings; its ``num_inference_steps`` fixes the step grid
            (attention is recorded at all N steps).
        display_size: longest side in pixels of the displayed overlay.

    The metrics use the boxes of the phrase on this image when the data set has that
    phrase there, else the selected sample's boxes (e.g. for a typed phrase).

    Attributes:
        widgets: name -> widget: ``sample``, ``phrase``, ``layers``, ``steps``, ``tokens``,
            ``pooling``, ``normalize``, ``sigma``, ``otsu``.
        last_heatmap: (H, W) original-frame heatmap of the last update (NaN outside the crop).
        last_metrics: the metrics of the last update against the sample's boxes.
        last_seconds: wall time of the last update (re-aggregation, scoring, drawing).
        unet_runs: number of inversions so far (one per new (image, phrase)).
    """

    def __init__(
        self,
        pipe,
        samples: Sequence[Sample],
        images: str | Path,
        config: GroundingConfig | str = "demo",
        display_size: int = 384,
    ):
        import ipywidgets as w

        if not samples:
            raise ValueError("the explorer needs at least one sample")
        self.pipe, self.samples, self.images = pipe, list(samples), Path(images)
        self.config = as_config(config)
        self.display_size = display_size
        self._caches: dict[tuple[str, str], Any] = {}
        self._images: dict[str, np.ndarray] = {}
        self._busy = False
        self.unet_runs = 0
        self.last_heatmap: np.ndarray | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_seconds = 0.0

        from ..method.attention import cross_attention_layers

        n_layers = len(cross_attention_layers(pipe.unet))
        n = self.config.num_inference_steps
        window = self.config.window_indices()
        layers = list(range(n_layers)) if self.config.layers is None else list(self.config.layers)
        first = self.samples[0]
        self.widgets: dict[str, Any] = {
            "sample": w.Dropdown(
                options=[(f"{i}: {s.category}: {s.phrase[:50]}", i) for i, s in enumerate(self.samples)],
                value=0,
                description="sample",
                layout=w.Layout(width="520px"),
            ),
            "phrase": w.Combobox(
                value=first.phrase,
                options=self._phrases_of(first),
                description="phrase",
                ensure_option=False,
                continuous_update=False,
                layout=w.Layout(width="520px"),
            ),
            "layers": w.SelectMultiple(
                options=list(range(n_layers)), value=layers, description="layers", rows=min(n_layers, 8)
            ),
            "steps": w.IntRangeSlider(
                value=(window.start, window.stop - 1), min=0, max=n - 1, description="steps", continuous_update=False
            ),
            "tokens": w.ToggleButtons(options=["phrase", "class"], value=self.config.tokens, description="tokens"),
            "pooling": w.ToggleButtons(
                options=["mean", "max", "median"], value=self.config.pooling, description="pooling"
            ),
            "normalize": w.Checkbox(value=self.config.normalize_maps, description="min-max each map"),
            "sigma": w.FloatSlider(
                value=self.config.sigma, min=0.0, max=64.0, step=0.5, description="sigma", continuous_update=False
            ),
            "otsu": w.Checkbox(value=self.config.otsu, description="Otsu"),
            "contrast": w.FloatSlider(
                value=self.config.contrast, min=0.0, max=1.5, step=0.05, description="contrast", continuous_update=False
            ),
        }
        self.image_widget = w.Image(format="png")
        self.metrics_widget = w.HTML()
        self.status_widget = w.HTML()
        self.widgets["sample"].observe(self._on_sample, names="value")
        for name, widget in self.widgets.items():
            if name != "sample":
                widget.observe(self._on_change, names="value")
        controls = w.VBox([self.widgets[k] for k in self.widgets])
        self.ui = w.VBox([controls, w.HBox([self.image_widget, w.VBox([self.metrics_widget, self.status_widget])])])
        self.update()

    # --- state --------------------------------------------------------------------------------

    @property
    def sample(self) -> Sample:
        return self.samples[self.widgets["sample"].value]

    def _phrases_of(self, sample: Sample) -> list[str]:
        return list(dict.fromkeys(s.phrase for s in self.samples if s.path == sample.path))

    def _boxes(self, sample: Sample, phrase: str):
        """The boxes of ``phrase`` on this image when the data set has it, else the sample's."""
        for s in self.samples:
            if s.path == sample.path and s.phrase == phrase:
                return s.boxes
        return sample.boxes

    def image(self, sample: Sample) -> np.ndarray:
        if sample.path not in self._images:
            self._images[sample.path] = load_image(self.images / sample.path)
        return self._images[sample.path]

    def cached(self, sample: Sample, phrase: str) -> CachedSample:
        """The attention of (sample's image, phrase) at every layer and step; inverts once."""
        from ..method.grounding import attention_cache

        cfg = full_window(self.config)
        key = (sample.path, phrase)
        if key not in self._caches:
            # the reference phrases ride along so that the contrast slider needs no new inversion
            self._caches[key] = attention_cache(self.pipe, self.image(sample), [phrase], cfg, cfg.reference_phrases)
            self.unet_runs += 1
        cache = self._caches[key]
        return CachedSample(
            sample, self.image(sample), cache, 0, class_token_indices(cache.tokens[0], sample.category), cfg
        )

    def current_config(self) -> GroundingConfig:
        """The config the widgets describe (layers and steps are passed separately)."""
        v = {k: wd.value for k, wd in self.widgets.items()}
        return self.config.replace(
            tokens=v["tokens"],
            pooling=v["pooling"],
            normalize_maps=bool(v["normalize"]),
            sigma=float(v["sigma"]),
            otsu=bool(v["otsu"]),
            contrast=float(v["contrast"]),
        )

    # --- updates ------------------------------------------------------------------------------

    def _on_sample(self, change) -> None:
        sample = self.sample
        self._busy = True
        try:
            self.widgets["phrase"].options = self._phrases_of(sample)
            self.widgets["phrase"].value = sample.phrase
        finally:
            self._busy = False
        self.update()

    def _on_change(self, change) -> None:
        if not self._busy:
            self.update()

    def update(self) -> None:
        """Re-aggregate, score and redraw from the widgets' values."""
        start = time.perf_counter()
        sample, phrase = self.sample, str(self.widgets["phrase"].value).strip()
        layers = list(self.widgets["layers"].value)
        lo, hi = self.widgets["steps"].value
        if not phrase or not layers:
            self.status_widget.value = "<i>choose at least one layer and type a phrase</i>"
            return
        try:
            cs = self.cached(sample, phrase)
        except Exception as err:  # show a user's bad phrase in the UI instead of raising
            self.status_widget.value = f"<b>error:</b> {err}"
            return
        cfg = self.current_config()
        _, heatmap = heatmap_from_cache(cs, cfg, layers=layers, steps=list(range(lo, hi + 1)))
        boxes = self._boxes(sample, phrase)
        self.last_heatmap = heatmap
        self.last_metrics = all_metrics(heatmap, boxes)
        self.image_widget.value = self._png(cs.image, heatmap, boxes)
        self.metrics_widget.value = "<br>".join(f"<b>{k}</b>: {self.last_metrics[k]:.3f}" for k in SHOWN_METRICS)
        self.last_seconds = time.perf_counter() - start
        tokens = cs.cache.tokens[0]
        used = [tokens.pieces[i] for i in cs.class_tokens] if cfg.tokens == "class" else list(tokens.pieces)
        self.status_widget.value = (
            f"tokens: {' '.join(used)}<br>inversions so far: {self.unet_runs}<br>update: {self.last_seconds:.2f} s"
        )

    def _png(self, image: np.ndarray, heatmap: np.ndarray, boxes) -> bytes:
        pic = overlay(image, heatmap, boxes)
        scale = self.display_size / max(pic.size)
        pic = pic.resize((round(pic.size[0] * scale), round(pic.size[1] * scale)))
        buf = io.BytesIO()
        pic.save(buf, format="png")
        return buf.getvalue()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.ui)
