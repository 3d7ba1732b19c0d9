"""Type aliases shared by the whole package (JAX-free, so `config` and `settings` can use them).

`PyTree`: any nested structure of containers (dict, list, tuple, NamedTuple, dataclass pytrees,
NNX `State`) whose leaves are arrays; stacked client trees carry a leading client axis `N` on
every leaf. Shapes of individual arrays are annotated with `jaxtyping` where they are used.
"""

from __future__ import annotations

from typing import Any

PyTree = Any

__all__ = ["PyTree"]
