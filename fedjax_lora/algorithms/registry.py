"""The one registry of named methods: `register(name, factory, options, doc=...)`.

A registered method is a factory `(problem, options) -> Algorithm` and its default options, an
instance of one frozen dataclass (`NoOptions` for a method without any). Every field of that
dataclass is an option a user sets as `method_options.<name>.<field>` (a nested dataclass field
by its dotted keys, `method_options.comigs.schedule.router_every`); config sections,
`fedjax-lora methods` and docs/api.md are generated from this registry
(`fedjax_lora.options`). Variants of one algorithm are registered under their own names with
their own defaults (`comigs-2g`, `fedavg-tokens`, `fdlora-comigs`), so a run is always logged
under the name of what it ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from fedjax_lora.algorithms.base import Algorithm
from fedjax_lora.algorithms.problem import Problem, SideData

__all__ = ["METHODS", "MethodSpec", "NoOptions", "get_method", "register"]


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a method that takes none."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method: `factory(problem, options) -> Algorithm`, its default `options` (a
    frozen dataclass instance), a one-line `doc` and the `side` data it reads (`SideData`: the
    problem builder provides it when the method is run).

    `spec(problem)` builds it with the defaults; `spec(problem, options)` with an instance of the
    same dataclass; `spec(problem, **changes)` with the defaults' fields replaced."""

    name: str
    factory: Callable[[Problem, Any], Algorithm]
    options: Any
    doc: str
    side: SideData = SideData()

    def __call__(self, problem: Problem, options: Any = None, **changes: Any) -> Algorithm:
        options = self.options if options is None else options
        if type(options) is not type(self.options):
            raise TypeError(
                f"method {self.name!r} takes {type(self.options).__name__} options, got "
                f"{type(options).__name__}"
            )
        return self.factory(problem, dataclasses.replace(options, **changes))


METHODS: dict[str, MethodSpec] = {}
"""Every registered method by name (filled as the method modules are imported:
`fedjax_lora.algorithms.methods` imports the library's)."""


def register(
    name: str,
    factory: Callable[[Problem, Any], Algorithm],
    options: Any = NoOptions(),
    *,
    doc: str | None = None,
    side: SideData = SideData(),
) -> MethodSpec:
    """Registers `factory` as method `name` with default `options` (a frozen dataclass instance,
    or the dataclass itself for its defaults). `doc`: one line for `fedjax-lora methods` (default:
    the first sentence of the factory's docstring). `side`: the side data the method reads
    (`SideData`, e.g. `SideData(aux=0.05)`: the reference's 5 % auxiliary split), built by
    `experiment.build_problem` only when the method is run."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    if isinstance(options, type):
        options = options()
    if not dataclasses.is_dataclass(options) or not type(options).__dataclass_params__.frozen:
        raise TypeError(f"method {name!r}: options must be a frozen dataclass, got {options!r}")
    if doc is None:
        text = " ".join((getattr(factory, "__doc__", None) or "").split())
        doc = text.split(". ")[0].rstrip(".")
    METHODS[name] = spec = MethodSpec(name, factory, options, doc, side)
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method `name`; an unknown name raises, listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}") from None
