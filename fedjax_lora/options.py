"""Method options as a user sets them: `method_options.<method>.<key>` and their defaults.

A registered method is a factory `(problem, **options) -> Algorithm`; its options are the keyword
parameters after `problem`. An option whose default is an options dataclass (`BiLevel`,
`FDLoRAOptions`, `TrustOptions`, ...) is listed field by field (`schedule.router_every`), nested
dataclasses recursively, so every default a user can change is shown. `fedjax-lora methods` and
`docs/api.md` print this listing.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["Option", "describe_methods", "method_options"]


class Option(NamedTuple):
    """One settable value: dotted `key` under `method_options.<method>`, its annotation as
    written, and the default's `repr`."""

    key: str
    type: str
    default: str


def _text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", text)  # `a.b.C` -> `C`


def _expand(key: str, annotation: Any, default: Any) -> list[Option]:
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return [
            option
            for field in dataclasses.fields(default)
            if field.init
            for option in _expand(f"{key}.{field.name}", field.type, getattr(default, field.name))
        ]
    shown = "(required)" if default is inspect.Parameter.empty else repr(default)
    return [Option(key, _text(annotation), shown)]


def method_options(factory: Callable[..., Any]) -> list[Option]:
    """The options of a method factory (every keyword parameter after the problem), dataclass
    defaults expanded into one `Option` per field."""
    parameters = list(inspect.signature(factory).parameters.values())[1:]
    return [
        option
        for p in parameters
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for option in _expand(p.name, p.annotation, p.default)
    ]


def summary(factory: Callable[..., Any]) -> str:
    """The first sentence of the factory's docstring."""
    doc = " ".join((factory.__doc__ or "").split())
    return doc.split(". ")[0].rstrip(".")


def describe_methods(methods: Mapping[str, Callable[..., Any]]) -> str:
    """Every method, sorted: its name and summary, then one indented line per option
    (`key: type = default`)."""
    lines = []
    for name, factory in sorted(methods.items()):
        lines.append(f"{name:16s} {summary(factory)}")
        lines += [
            f"    {o.key}: {o.type} = {o.default}" if o.type else f"    {o.key} = {o.default}"
            for o in method_options(factory)
        ]
    return "\n".join(lines)
