"""Experiments from an `ExperimentConfig` to results on disk, in four modules:

- `sources`: the data-source registry (`register_source`, `SOURCES`; one builder per
  `data.source`, each checked before it is built), JAX-free so the config checks `data.source`
  before JAX loads;
- `problem`: the base model, the clients' data (`build_data`), evaluation windows, side data and
  the instruction task assembled into a `Problem` (`build_problem`); `method_factory`;
- `records`: round records and their costs, final analyses, the summary, results table and
  figures (`write_results`);
- `run`: `run_method`, `train_and_evaluate`, `train_and_evaluate_seeds`, divergence checks,
  `resumable`.

Every name below is importable from `fedjax_lora.experiment`; it loads its module on first
access (PEP 562), so importing the registry leaves JAX unimported.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "sources": (
        "SOURCES",
        "SIDE_DATA",
        "SourceSpec",
        "checked_source",
        "describe_sources",
        "get_source",
        "register_source",
        "side_data_fix",
        "text_tokenizer",
    ),
    "problem": (
        "SPLITS",
        "base_tokenizer",
        "build_data",
        "build_model",
        "build_problem",
        "check_side_data",
        "method_factory",
        "side_needs",
    ),
    "records": (
        "Costs",
        "_round_record",
        "final_analyses",
        "final_experts",
        "final_trust",
        "method_metric",
        "results_rows",
        "results_table",
        "round_costs",
        "scored",
        "summarize",
        "write_results",
    ),
    "run": (
        "COLLAPSE_TOLERANCE",
        "DIVERGENCE_FACTOR",
        "_finite_or_raise",
        "_finite_per_client",
        "diverged_clients",
        "resumable",
        "run_method",
        "train_and_evaluate",
        "train_and_evaluate_seeds",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for name in _MODULE_OF if not name.startswith("_")]


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
