"""An ipywidgets explorer: one sample, two phrases side by side, every knob of the aggregation live.

The attention of all layers at every step is recorded once per (image, phrase) through
:func:`ldmground.studies.cache.phrase_attention` and kept; moving a slider only re-aggregates
(:func:`ldmground.studies.cache.heatmap_from_cache`) and re-scores, well under a second for a
64-px model. The second phrase ("compare"; by default the first with left and right swapped)
is read on the same image with the same settings, scored against the same boxes. The
reference phrases of ``contrast`` are recorded once per image.

Usable headless: set ``ex.widgets[name].value`` and read ``ex.last_heatmap``,
``ex.last_metrics`` (the first phrase), ``ex.last_compare_heatmap``, ``ex.last_compare_metrics``
and ``ex.shown`` (which sample and phrases they describe); ``ex.unet_runs`` counts the
inversions so far.

Example (in a notebook)::

    from ldmground.studies.explorer import Explorer
    ex = Explorer(pipe, samples, "data/phantom", "demo")
    ex   # displays the controls, the two overlays and their metrics
"""

from __future__ import annotations

import html
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GroundingConfig
from ..datasets.mscxr import Sample
from ..method.heatmap import load_image
from ..method.tokens import swap_sides
from ..method.trajectory import TrajectoryCache
from ..metrics import all_metrics
from . import explorer_layout as layout
from .cache import (
    CachedSample,
    as_config,
    class_token_indices,
    full_window,
    heatmap_from_cache,
    phrase_attention,
    token_words,
)
from .overlay import overlay

SHOWN_METRICS = list(layout.SHOWN_METRICS)
_AMBER = "#b36b00"


class Explorer:
    """Interactive grounding of one sample at a time, two phrases side by side.

    Args:
        pipe: a :class:`~ldmground.models.pipeline.GroundingPipeline`.
        samples: the pairs to choose from (boxes give the metrics).
        images: the folder the samples' ``path`` is relative to.
        config: the starting settings (:meth:`reset` returns to them); its
            ``num_inference_steps`` fixes the step grid (attention is recorded at all N steps).
        display_size: longest side in pixels of each displayed overlay.

    The metrics of a phrase use its boxes on this image when the data set has that phrase
    there, else the selected sample's boxes (e.g. for a typed or swapped phrase).

    Attributes:
        widgets: name -> widget: ``sample``, ``phrase``, ``compare``, ``layers``, ``steps``,
            ``tokens``, ``no_class`` (``"all"``: read every phrase token when the class name is
            not in the phrase; ``"none"``: no map), ``pooling``, ``normalize``, ``sigma``,
            ``otsu``, ``contrast``.
        last_heatmap, last_compare_heatmap: (H, W) original-frame heatmaps of the last update
            (NaN outside the crop; None when there is no map).
        last_metrics, last_compare_metrics: their metrics ({} when there is no map).
        shown: ``{"sample", "phrase", "compare"}`` that the displayed images, metrics and
            status describe.
        last_error: what the view says is wrong (no layer, empty phrase, ...), or None.
        last_seconds: wall time of the last update (re-aggregation, scoring, drawing).
        last_record_seconds: wall time of the last recording (inversion), 0 before any.
        unet_runs: number of recordings so far (one per image, plus one per batch of new
            phrases on an image already seen).
    """

    def __init__(
        self,
        pipe,
        samples: Sequence[Sample],
        images: str | Path,
        config: GroundingConfig | str = "demo",
        display_size: int = layout.PANEL_WIDTH,
    ):
        import ipywidgets as w

        if not samples:
            raise ValueError("the explorer needs at least one sample")
        self.pipe, self.samples, self.images = pipe, list(samples), Path(images)
        self.config = as_config(config)
        self.record_config = full_window(self.config)
        self.display_size = display_size
        self._phrases: dict[str, dict[str, Any]] = {}  # image path -> phrase -> AttentionCache
        self._references: dict[str, Any] = {}  # image path -> AttentionCache of the references
        self._images: dict[str, np.ndarray] = {}
        self._syncing = False
        self._compare_auto = True
        self.unet_runs = 0
        self.trajectories = TrajectoryCache()  # a typed phrase on a seen image skips the walk
        self.last_heatmap: np.ndarray | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_compare_heatmap: np.ndarray | None = None
        self.last_compare_metrics: dict[str, float] = {}
        self.shown: dict[str, Any] = {}
        self.last_error: str | None = None
        self.last_seconds = 0.0
        self.last_record_seconds = 0.0

        self.layer_names = layout.layer_labels(pipe)
        self.widgets: dict[str, Any] = layout.build_controls(
            self.config, self.layer_names, self.config.num_inference_steps, self.samples
        )
        self.panels = [layout.Panel(self.widgets["phrase"]), layout.Panel(self.widgets["compare"])]
        self.status_widget = w.HTML(layout=w.Layout(margin="0 0 0 12px", width="380px", height="34px"))
        self.progress = w.IntProgress(
            value=0, min=0, max=1, description="inverting", layout=w.Layout(width="560px", visibility="hidden")
        )
        self.ui = layout.arrange(self.widgets, self.panels, self.status_widget, self.progress)
        self._set_phrases(self.samples[0])
        self.widgets["sample"].observe(self._on_sample, names="value")
        self.widgets["phrase"].observe(self._on_phrase, names="value")
        self.widgets["compare"].observe(self._on_compare, names="value")
        for name, widget in self.widgets.items():
            if name not in ("sample", "phrase", "compare"):
                widget.observe(self._on_change, names="value")
        self.update()

    # --- state --------------------------------------------------------------------------------

    @property
    def sample(self) -> Sample:
        return self.samples[self.widgets["sample"].value]

    @property
    def image_widget(self):
        """The overlay of the first phrase."""
        return self.panels[0].image

    def _phrases_of(self, sample: Sample) -> list[str]:
        return list(dict.fromkeys(s.phrase for s in self.samples if s.path == sample.path))

    def _boxes(self, sample: Sample, phrase: str) -> tuple[Any, bool]:
        """The boxes of ``phrase`` on this image when the data set has it (True), else the sample's."""
        for s in self.samples:
            if s.path == sample.path and s.phrase == phrase:
                return s.boxes, True
        return sample.boxes, False

    def image(self, sample: Sample) -> np.ndarray:
        if sample.path not in self._images:
            self._images[sample.path] = load_image(self.images / sample.path)
        return self._images[sample.path]

    def cached(self, sample: Sample, phrase: str) -> CachedSample:
        """The attention of (sample's image, phrase) at every layer and step; records it if new."""
        from ..method.grounding import AttentionCache

        self._record(sample, [phrase])
        cache = self._phrases[sample.path][phrase]
        refs = self._references[sample.path]
        joined = AttentionCache(
            cache.maps, cache.tokens, cache.geometry, cache.image_size, refs.reference_maps, refs.references
        )
        fallback = self.widgets["no_class"].value == "all"
        tokens = class_token_indices(cache.tokens[0], sample.category, fallback=fallback)
        return CachedSample(sample, self.image(sample), joined, 0, tokens, self.record_config)

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

    def reset(self) -> None:
        """Every aggregation control back to the starting config (the sample and phrases stay)."""
        fresh = layout.build_controls(self.config, self.layer_names, self.config.num_inference_steps, self.samples)
        self._syncing = True
        try:
            for name, widget in self.widgets.items():
                if name not in ("sample", "phrase", "compare"):
                    widget.value = fresh[name].value
        finally:
            self._syncing = False
            for widget in fresh.values():
                widget.close()
        self.update()

    # --- recording (the only place the UNet runs) ----------------------------------------------

    def _record(self, sample: Sample, phrases: Sequence[str]) -> float:
        """Record the phrases of ``phrases`` not yet seen on this image, in one walk.

        The view says it is working meanwhile: a progress bar over the inversion steps, the
        controls that would start another recording disabled, the new sample's X-ray without
        a map. A new image also records the config's reference phrases (for ``contrast``).
        Returns the seconds spent (0 when everything was recorded already).
        """
        seen = self._phrases.setdefault(sample.path, {})
        new = [p for p in dict.fromkeys(phrases) if p not in seen]
        first = sample.path not in self._references
        if not new and not first:
            return 0.0
        references = self.record_config.reference_phrases if first else ()
        self._working(sample, new)
        start = time.perf_counter()
        try:
            cache = phrase_attention(
                self.pipe,
                self.image(sample),
                new,
                self.record_config,
                references,
                on_step=self._on_step,
                trajectories=self.trajectories,
            )
        finally:
            self._idle()
        self.last_record_seconds = time.perf_counter() - start
        self.unet_runs += 1
        if first:
            self._references[sample.path] = cache
        for i, phrase in enumerate(new):
            seen[phrase] = type(cache)([cache.maps[i]], [cache.tokens[i]], cache.geometry, cache.image_size)
        return self.last_record_seconds

    def _working(self, sample: Sample, phrases: Sequence[str]) -> None:
        for name in ("sample", "phrase", "compare"):
            self.widgets[name].disabled = True
        what = ", ".join(f"“{html.escape(p)}”" for p in phrases) or "the reference phrases"
        self.status_widget.value = f"<b>working:</b> inverting sample {self.widgets['sample'].value} for {what}"
        self.progress.value, self.progress.layout.visibility = 0, "visible"
        plain = self._png(self.image(sample), None, ())
        for panel in self.panels:
            panel.image.value = plain
            panel.caption.value = "<i>working…</i>"
            panel.metrics.value = layout.metrics_html(None)
            panel.note.value = ""

    def _on_step(self, done: int, total: int) -> None:
        self.progress.max = total
        self.progress.value = done

    def _idle(self) -> None:
        self.progress.layout.visibility = "hidden"
        for name in ("sample", "phrase", "compare"):
            self.widgets[name].disabled = False

    # --- updates ------------------------------------------------------------------------------

    def _set_phrases(self, sample: Sample) -> None:
        """The sample's own phrase, and its left/right swap to compare (empty when it names no side)."""
        self._syncing = True
        try:
            self.widgets["phrase"].options = self._phrases_of(sample)
            self.widgets["phrase"].value = sample.phrase
            swapped = swap_sides(sample.phrase)
            self.widgets["compare"].value = swapped if swapped != sample.phrase else ""
            self._compare_auto = True
        finally:
            self._syncing = False

    def _on_sample(self, change) -> None:
        self._set_phrases(self.sample)
        self.update()

    def _on_phrase(self, change) -> None:
        if self._syncing:
            return
        if self._compare_auto:  # the comparison follows the phrase until the user types one
            phrase = str(change["new"]).strip()
            swapped = swap_sides(phrase)
            self._syncing = True
            try:
                self.widgets["compare"].value = swapped if swapped != phrase else ""
            finally:
                self._syncing = False
        self.update()

    def _on_compare(self, change) -> None:
        if self._syncing:
            return
        self._compare_auto = not str(change["new"]).strip()
        self.update()

    def _on_change(self, change) -> None:
        if not self._syncing:
            self.update()

    def update(self) -> None:
        """Record what is missing, re-aggregate, score and redraw from the widgets' values.

        The images, metrics, captions and status are replaced together, so that they always
        describe the same sample and phrases (``self.shown``).
        """
        start = time.perf_counter()
        index, sample = self.widgets["sample"].value, self.sample
        phrase = str(self.widgets["phrase"].value).strip()
        compare = str(self.widgets["compare"].value).strip()
        problem = None
        if not self.widgets["layers"].value:
            problem = "No layer selected: choose one or more in <b>layers</b> (ctrl-click)."
        elif not phrase:
            problem = "The phrase is empty: type one, or pick the sample's own from the list."
        recorded = 0.0
        if problem is None:
            try:
                recorded = self._record(sample, [p for p in (phrase, compare) if p])
                views = [self._view(sample, phrase), self._view(sample, compare)]
            except Exception as err:  # a bad phrase or setting: say so in the view, never raise
                problem = f"{type(err).__name__}: {html.escape(str(err))}"
        if problem is not None:
            self._show_problem(index, sample, phrase, compare, problem)
            return
        a, b = views
        self.widgets["no_class"].disabled = self.widgets["tokens"].value != "class"
        self.last_heatmap, self.last_metrics = a["heatmap"], a["metrics"]
        self.last_compare_heatmap, self.last_compare_metrics = b["heatmap"], b["metrics"]
        self.last_error = None
        self.shown = {"sample": index, "phrase": phrase, "compare": compare}
        for panel, view in zip(self.panels, views, strict=True):
            panel.image.value = view["png"]
            panel.caption.value = view["caption"]
            panel.metrics.value = layout.metrics_html(view["metrics"])
            panel.note.value = view["note"]
        self.last_seconds = time.perf_counter() - start
        inverted = f" (this one {recorded:.1f} s)" if recorded else ""
        self.status_widget.value = (
            f"redraw {self.last_seconds - recorded:.2f} s · inversions so far: {self.unet_runs}{inverted}"
        )

    def _view(self, sample: Sample, phrase: str) -> dict[str, Any]:
        """Heatmap, metrics, picture, caption and note of one phrase on the sample's image."""
        index = self.widgets["sample"].value
        boxes, own = self._boxes(sample, phrase)
        scored = "its own" if own else f"sample {index}'s"
        caption = f"<small>#{index} {html.escape(sample.category)} · boxes: {scored}</small>"
        if not phrase:
            note = "<small>type a second phrase to compare (this one names no side to swap)</small>"
            png = self._png(self.image(sample), None, boxes)
            return {"heatmap": None, "metrics": {}, "png": png, "caption": caption, "note": note}
        cs = self.cached(sample, phrase)
        cfg = self.current_config()
        lo, hi = self.widgets["steps"].value
        layers = list(self.widgets["layers"].value)
        _, heatmap = heatmap_from_cache(cs, cfg, layers=layers, steps=list(range(lo, hi + 1)))
        tokens = cs.cache.tokens[0]
        has_class = bool(class_token_indices(tokens, sample.category, fallback=False))
        lines = []
        if cfg.tokens == "class" and not has_class:
            what = "all phrase tokens read" if self.widgets["no_class"].value == "all" else "no map (authors' rule)"
            name = html.escape(sample.category)
            lines.append(f"<span style='color:{_AMBER}'>“{name}” not in the phrase: {what}</span>")
        elif cfg.tokens == "class":
            lines.append(f"reads: {html.escape(' '.join(token_words(tokens, cs.class_tokens)))}")
        else:
            lines.append(f"reads: {html.escape(' '.join(token_words(tokens)))}")
        nomap = not np.isfinite(heatmap).any()
        metrics = {} if nomap else all_metrics(heatmap, boxes)
        return {
            "heatmap": None if nomap else heatmap,
            "metrics": metrics,
            "png": self._png(cs.image, None if nomap else heatmap, boxes),
            "caption": caption,
            "note": "<small>" + "<br>".join(lines) + "</small>",
        }

    def _show_problem(self, index: int, sample: Sample, phrase: str, compare: str, problem: str) -> None:
        """Clear both maps and their metrics and say what to do."""
        self.last_heatmap = self.last_compare_heatmap = None
        self.last_metrics, self.last_compare_metrics = {}, {}
        self.last_error = problem
        self.shown = {"sample": index, "phrase": phrase, "compare": compare}
        plain = self._png(self.image(sample), None, sample.boxes)
        for panel in self.panels:
            panel.image.value = plain
            panel.caption.value = f"<small>#{index} {html.escape(sample.category)}: no map</small>"
            panel.metrics.value = layout.metrics_html(None)
            panel.note.value = ""
        self.status_widget.value = f"<span style='color:#b00020'>{problem}</span>"

    def _png(self, image: np.ndarray, heatmap: np.ndarray | None, boxes) -> bytes:
        pic = overlay(image, np.zeros_like(image) if heatmap is None else heatmap, boxes)
        scale = self.display_size / max(pic.size)
        pic = pic.resize((round(pic.size[0] * scale), round(pic.size[1] * scale)))
        buf = io.BytesIO()
        pic.save(buf, format="png")
        return buf.getvalue()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.ui)

    def show(self) -> None:
        """Display the explorer and bring it to the top of the notebook's view: after Run All,
        JupyterLab leaves the last cell's first line at the bottom of the window, which would
        put the explorer below the fold."""
        from IPython.display import Javascript, display

        display(self.ui)
        display(Javascript(_SCROLL_TO_EXPLORER))


# The widget renders asynchronously: look for it for up to 5 s, then scroll it to the top.
_SCROLL_TO_EXPLORER = """
(function find(tries) {
  const all = document.querySelectorAll('.ldmground-explorer');
  const last = all[all.length - 1];
  if (last && last.querySelector('img')) { last.scrollIntoView({block: 'start'}); }
  else if (tries > 0) { setTimeout(() => find(tries - 1), 100); }
})(50);
"""
