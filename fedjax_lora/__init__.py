"""fedjax_lora: simulate personalized collaborative fine-tuning of language models in JAX.

The public subpackages and modules load on first attribute access (PEP 562), so
`import fedjax_lora; fedjax_lora.models.load(...)` works while `import fedjax_lora.config`
(the CLI's first step) still leaves JAX unimported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

SUBMODULES = (
    "aggregation",
    "algorithms",
    "amole",
    "checkpoint",
    "config",
    "data",
    "distributed",
    "engine",
    "errors",
    "experiment",
    "export",
    "families",
    "grid",
    "lora",
    "memory",
    "models",
    "moe",
    "plots",
    "presets",
    "prompt_tuning",
    "report",
    "settings",
    "sweep",
    "tracking",
    "typing",
)

__all__ = ["__version__", *SUBMODULES]


def __getattr__(name: str) -> ModuleType:
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
