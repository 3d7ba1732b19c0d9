"""Method options as a user sets them: `method_options.<method>.<key>`, their types and defaults.

Every registered method (`fedjax_lora.algorithms.registry`) has one frozen options dataclass;
its fields are the options, a nested dataclass field by its dotted keys
(`schedule.router_every`). `option_list` lists them, `describe_methods` prints the listing of
`fedjax-lora methods` (docs/api.md tabulates the same list), and `resolve` turns a config's
`method_options.<method>` mapping into the options instance, checked before any compute.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Mapping
from typing import Any, NamedTuple

from fedjax_lora.config import convert
from fedjax_lora.errors import ConfigError

__all__ = ["Option", "describe_methods", "option_list", "resolve"]


class Option(NamedTuple):
    """One settable value: dotted `key` under `method_options.<method>`, its annotation as
    written, and the default's `repr`."""

    key: str
    type: str
    default: str


def _text(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", text)  # `a.b.C` -> `C`


def option_list(options: Any, prefix: str = "") -> list[Option]:
    """Every field of the options instance `options` with its default, nested dataclass values
    expanded field by field (`schedule.router_optimizer.lr`)."""
    out = []
    for field in dataclasses.fields(options):
        value, key = getattr(options, field.name), prefix + field.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += option_list(value, f"{key}.")
        else:
            out.append(Option(key, _text(field.type), repr(value)))
    return out


def describe_methods(methods: Mapping[str, Any]) -> str:
    """Every method (`MethodSpec`), sorted: its name and one-line doc, then one indented line per
    option (`key: type = default`)."""
    lines = []
    for name, spec in sorted(methods.items()):
        lines.append(f"{name:16s} {spec.doc}")
        lines += [f"    {o.key}: {o.type} = {o.default}" for o in option_list(spec.options)]
    return "\n".join(lines)


# Keys of the options before every method had one options dataclass: one line each on the new key.
_FLAT = "the options are flat now: write {where}.<option> instead of {where}.%s.<option>"
_MOVED = {
    "options": _FLAT % "options",
    "trust": _FLAT % "trust",
    "config": "the prompt is set as {where}.prompt now (was {where}.config)",
    "fine_tuned": "the fine-tuned variant is its own method now: run '{name}-ft' instead",
}


def resolve(defaults: Any, values: Mapping[str, Any], where: str) -> Any:
    """`defaults` (an options dataclass instance) with the fields in `values` (YAML data: a
    config's `method_options.<method>`) replaced, each converted to its annotated type; a mapping
    for a dataclass-valued field is resolved onto that field's default, key by key. `where`
    names the section in errors: an unknown key raises one line listing the valid ones (or, for a
    key of the former layout, naming its new place)."""
    names = [f.name for f in dataclasses.fields(defaults)]
    unknown = sorted(set(values) - set(names))
    for key in unknown:
        if key in _MOVED:
            raise ConfigError(
                f"{where}.{key} is gone: "
                + _MOVED[key].format(where=where, name=where.rsplit(".", 1)[-1])
            )
    if unknown:
        raise ConfigError(f"{where} has no option(s) {unknown}; valid options: {names}")
    hints = typing.get_type_hints(type(defaults))
    changes = {}
    for key, value in values.items():
        current = getattr(defaults, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = resolve(current, value, f"{where}.{key}")
        else:
            changes[key] = convert(hints[key], value, f"{where}.{key}")
    try:
        return dataclasses.replace(defaults, **changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {where}: {e}") from None
