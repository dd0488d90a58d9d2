"""The explorer's widgets and their arrangement on one screen (see :mod:`.explorer`).

Everything here builds widgets and pictures; nothing runs the model. The screen, sized for a
1366x768 browser window with JupyterLab around it (~1000 x 600 px for the output)::

    sample [dropdown ...........................................]  status
    +- what is read -----+  phrase [.............]  compare [.............]
    | layers (list)      |  caption                 caption
    | steps   [===]      |  +-----------+           +-----------+   colour
    | tokens  phrase|cls |  |  overlay  |           |  overlay  |   bar
    | no class word ...  |  +-----------+           +-----------+
    +- how combined -----+  metrics                 metrics
    | pooling, min-max   |  note                    note
    +- post-processing --+
    | sigma, Otsu, contr.|  [progress bar of an inversion, hidden when idle]
    +--------------------+
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import GroundingConfig
from .overlay import OVERLAY_CMAP

LABEL_WIDTH = "92px"  # every control's description column: the labels align
CONTROL_WIDTH = "350px"
PANEL_WIDTH = 264  # px of each overlay
FIELD_HEIGHT = 60  # px above each overlay: the phrase field and the caption
# ToggleButtons carry no inline-row class in ipywidgets 8: lay them out like the sliders
STYLE = """<style>
.ldmground-explorer .widget-toggle-buttons { display: flex; align-items: center; margin: 2px 0; }
.ldmground-explorer .widget-toggle-buttons > .widget-label {
  flex: none; text-align: right; margin-right: 4px; padding-right: 4px; }
.ldmground-explorer .widget-toggle-button { padding: 0 4px; }
.ldmground-explorer .widget-html-content { line-height: 1.35; }
.ldmground-explorer .ldmground-metrics td { padding: 0 10px 0 0; }
.ldmground-explorer .ldmground-status .widget-html-content { font-size: 12px; }
</style>"""
SIGMA_STEPS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0)
SHOWN_METRICS = {"cnr": "CNR", "miou": "mIoU", "auc_roc": "AUROC", "pointing": "pointing"}


def layer_labels(pipe) -> list[str]:
    """One label per cross-attention layer: index, UNet block and map resolution (e.g.
    ``"2 · up 1.0 · 8x8"``), from :func:`ldmground.studies.layers.layer_table`."""
    from .layers import layer_table

    return layer_table(pipe)["label"].tolist()


def sigma_options(value: float) -> list[float]:
    """The sigma slider's stops: round values a drag can hit, plus the config's own."""
    return sorted({*SIGMA_STEPS, float(value)})


def colour_bar_png(height: int = PANEL_WIDTH, width: int = 14, cmap: str = OVERLAY_CMAP) -> bytes:
    """A vertical colour bar of ``cmap`` (1 at the top, 0 at the bottom) as PNG bytes: by
    default the overlays' own colour map."""
    from matplotlib import colormaps
    from PIL import Image

    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(width, axis=1)
    rgb = (colormaps[cmap](ramp)[..., :3] * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="png")
    return buf.getvalue()


def metrics_html(metrics: dict[str, float] | None) -> str:
    """The shown metrics as a two-by-two table; dashes when there is no map."""
    cells = []
    for key, name in SHOWN_METRICS.items():
        value = None if not metrics else metrics.get(key)
        text = "—" if value is None or not np.isfinite(value) else f"{value:.2f}"
        cells.append(f"<td>{name} <b>{text}</b></td>")
    return f"<table><tr>{''.join(cells[:2])}</tr><tr>{''.join(cells[2:])}</tr></table>"


def build_controls(config: GroundingConfig, layer_names: Sequence[str], n_steps: int, samples) -> dict[str, Any]:
    """The explorer's widgets by name, set to ``config`` (see :class:`.explorer.Explorer`)."""
    import ipywidgets as w

    style = {"description_width": LABEL_WIDTH}
    wide = w.Layout(width=CONTROL_WIDTH)
    window = config.window_indices()
    layers = list(range(len(layer_names))) if config.layers is None else list(config.layers)
    toggles = {"description_width": LABEL_WIDTH, "button_width": "92px"}
    widgets = {
        "sample": w.Dropdown(
            options=[(f"{i}: {s.category}: {s.phrase[:60]}", i) for i, s in enumerate(samples)],
            value=0,
            description="sample",
            style={"description_width": "56px"},
            layout=w.Layout(width="560px"),
        ),
        "phrase": w.Combobox(
            description="phrase",
            ensure_option=False,
            continuous_update=False,
            placeholder="type a phrase",
            style={"description_width": "62px"},
            layout=w.Layout(width=f"{PANEL_WIDTH}px"),
        ),
        "compare": w.Text(
            description="compare",
            continuous_update=False,
            placeholder="a second phrase",
            style={"description_width": "62px"},
            layout=w.Layout(width=f"{PANEL_WIDTH}px"),
        ),
        "layers": w.SelectMultiple(
            options=[(label, i) for i, label in enumerate(layer_names)],
            value=layers,
            description="layers",
            rows=min(len(layer_names), 6),
            style=style,
            layout=wide,
        ),
        "steps": w.IntRangeSlider(
            value=(window.start, window.stop - 1),
            min=0,
            max=n_steps - 1,
            description="steps",
            continuous_update=False,
            style=style,
            layout=wide,
        ),
        "tokens": w.ToggleButtons(
            options=[("all phrase", "phrase"), ("class name", "class")],
            value=config.tokens if config.tokens in ("phrase", "class") else "phrase",
            description="tokens",
            style=toggles,
        ),
        "no_class": w.ToggleButtons(
            options=[("all tokens", "all"), ("no map", "none")],
            value="all",
            description="class absent",
            tooltips=[
                "read every phrase token when the class name is not in the phrase",
                "no map when the class name is not in the phrase (the authors' attribution rule)",
            ],
            style=toggles,
        ),
        "pooling": w.ToggleButtons(
            options=["mean", "max", "median"],
            value=config.pooling,
            description="pooling",
            style={"description_width": LABEL_WIDTH, "button_width": "62px"},
        ),
        "normalize": w.Checkbox(
            value=config.normalize_maps, description="min-max each map", indent=True, style=style, layout=wide
        ),
        "sigma": w.SelectionSlider(
            options=sigma_options(config.sigma),
            value=float(config.sigma),
            description="sigma (px)",
            continuous_update=False,
            style=style,
            layout=wide,
        ),
        "otsu": w.Checkbox(value=config.otsu, description="Otsu threshold", indent=True, style=style, layout=wide),
        "contrast": w.FloatSlider(
            value=config.contrast,
            min=0.0,
            max=1.5,
            step=0.05,
            description="contrast",
            continuous_update=False,
            readout_format=".2f",
            style=style,
            layout=wide,
        ),
    }
    for name, widget in widgets.items():  # CSS handles for the browser test and custom styling
        widget.add_class(f"ldmground-{name}")
    return widgets


class Panel:
    """One phrase's view: caption, overlay, metrics and a note (e.g. the class-name fallback)."""

    def __init__(self, field):
        import ipywidgets as w

        self.field = field
        self.caption = w.HTML(layout=w.Layout(width=f"{PANEL_WIDTH}px", height="20px", overflow="hidden"))
        self.image = w.Image(
            format="png", layout=w.Layout(width=f"{PANEL_WIDTH}px", height=f"{PANEL_WIDTH}px", object_fit="contain")
        )
        self.metrics = w.HTML(layout=w.Layout(width=f"{PANEL_WIDTH}px"))
        self.note = w.HTML(layout=w.Layout(width=f"{PANEL_WIDTH}px", height="40px", overflow="hidden"))
        self.box = w.VBox(
            [field, self.caption, self.image, self.metrics, self.note], layout=w.Layout(margin="0 8px 0 0")
        )
        self.box.add_class("ldmground-panel")
        self.image.add_class("ldmground-map")
        self.caption.add_class("ldmground-caption")
        self.metrics.add_class("ldmground-metrics")
        self.note.add_class("ldmground-note")


def _group(title: str, children) -> Any:
    import ipywidgets as w

    header = w.HTML(f"<b style='font-size:12px;color:#555'>{title}</b>", layout=w.Layout(height="20px"))
    return w.VBox(
        [header, *children],
        layout=w.Layout(border="1px solid #ddd", padding="0 4px 2px 4px", margin="0 0 4px 0", width="372px"),
    )


def arrange(widgets: dict[str, Any], panels: Sequence[Panel], status, progress) -> Any:
    """The whole screen as one widget (see the module's sketch)."""
    import ipywidgets as w

    controls = w.VBox(
        [
            _group("what is read", [widgets[k] for k in ("layers", "steps", "tokens", "no_class")]),
            _group("how it is combined", [widgets["pooling"], widgets["normalize"]]),
            _group("post-processing", [widgets[k] for k in ("sigma", "otsu", "contrast")]),
        ]
    )
    tick = w.Layout(height="16px", margin="0")
    bar = w.VBox(
        [
            w.HTML("<small>1</small>", layout=w.Layout(height="16px", margin=f"{FIELD_HEIGHT - 16}px 0 0 0")),
            w.Image(value=colour_bar_png(), format="png", layout=w.Layout(width="14px", height=f"{PANEL_WIDTH}px")),
            w.HTML("<small>0</small>", layout=tick),
        ],
        layout=w.Layout(width="30px"),
    )
    views = w.VBox([w.HBox([*(p.box for p in panels), bar]), progress])
    top = w.HBox([widgets["sample"], status], layout=w.Layout(align_items="center"))
    ui = w.VBox([w.HTML(STYLE), top, w.HBox([controls, views], layout=w.Layout(grid_gap="8px"))])
    ui.add_class("ldmground-explorer")
    status.add_class("ldmground-status")
    progress.add_class("ldmground-progress")
    return ui
