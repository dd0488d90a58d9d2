"""What the notebooks call: attention caches (``cache``), sweeps and ablation tables
(``sweeps``), probes of a model (``probes``), map panels and examples (``panels``), tables
with confidence intervals (``report``), the published reference numbers (``reference``),
figures (``figures``), overlays (``overlay``) and the interactive explorer (``explorer``).

May use every layer below it (``config``, ``metrics``, ``method``, ``models``, ``datasets``,
``runs``); never ``demo``. ``figures`` and ``explorer`` load matplotlib and ipywidgets, so
they are imported on their own (``from ldmground.studies import figures``).
"""

from .cache import (
    CachedSample,
    cache_samples,
    full_window,
    heatmap_from_cache,
    load_samples,
    pick_samples,
    score,
    shared_cache,
)
from .panels import load_examples, map_panels, save_examples, save_panels, to_markdown
from .probes import finding_visibility, phrase_attention_ratio, text_denoising_gain
from .report import comparison_table, summary_with_ci
from .sweeps import (
    aggregation_sweep,
    attribution_experiment,
    attribution_table,
    contrast_sweep,
    inversion_steps_sweep,
    layer_sweep,
    postprocess_sweep,
    step_sweep,
    summarize_sweep,
    sweep,
    threshold_sweep,
    window_sweep,
)

__all__ = [
    "CachedSample",
    "aggregation_sweep",
    "attribution_experiment",
    "attribution_table",
    "cache_samples",
    "comparison_table",
    "contrast_sweep",
    "finding_visibility",
    "full_window",
    "heatmap_from_cache",
    "inversion_steps_sweep",
    "layer_sweep",
    "load_examples",
    "load_samples",
    "map_panels",
    "pick_samples",
    "phrase_attention_ratio",
    "postprocess_sweep",
    "save_examples",
    "save_panels",
    "score",
    "shared_cache",
    "step_sweep",
    "summarize_sweep",
    "summary_with_ci",
    "sweep",
    "text_denoising_gain",
    "threshold_sweep",
    "to_markdown",
    "window_sweep",
]
