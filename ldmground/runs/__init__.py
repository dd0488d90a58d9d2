"""Batch evaluation: grounders (the diffusion method, BioViL, the centre prior and oracle
baselines), ``evaluate`` with its resumable results store, sharding and provenance.

May use: ``config``, ``metrics``, ``errors``, ``method``, ``models`` and ``datasets``; never
``studies`` or ``demo``.
"""

from .evaluation import EvaluationReport, evaluate, make_grounder, parse_shard, summarize
from .grounders import CentrePriorGrounder, DiffusionGrounder, Grounder, Heatmaps

__all__ = [
    "CentrePriorGrounder",
    "DiffusionGrounder",
    "EvaluationReport",
    "Grounder",
    "Heatmaps",
    "evaluate",
    "make_grounder",
    "parse_shard",
    "summarize",
]
