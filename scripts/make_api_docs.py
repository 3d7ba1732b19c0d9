"""Writes `docs/api.md`: the API reference of the aggregators, the registered methods, the data
sources and export.

Every public function and class of the `fedjax_lora.aggregation` modules (their `__all__`), the
aggregator registry, every method in `fedjax_lora.algorithms.registry.METHODS`, every data source
in `fedjax_lora.experiment.sources.SOURCES` (with `register_source`), and the export
functions (`fedjax_lora.export.__all__`, with the `fedjax-lora export` command), each with its
signature and the first paragraph of its docstring. Generated, never edited by hand:

    python scripts/make_api_docs.py            # rewrite docs/api.md
    python scripts/make_api_docs.py --check    # exit 1 when docs/api.md is stale

`tests/test_docs.py` fails when the committed file differs from what this script renders.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
WIDTH = 100


class _Annotation:
    """An annotation kept as written (`from __future__ import annotations` makes it a string)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def first_paragraph(obj: Any) -> str:
    """The docstring's first paragraph on one line ('(undocumented)' without a docstring)."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.strip().split("\n\n")[0].split()) or "(undocumented)"


def _clean(text: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", text)  # no memory addresses in default values


def signature(name: str, obj: Any) -> str:
    """`name(params) -> ret`, one line or one parameter per line when longer than `WIDTH`."""
    sig = inspect.signature(obj)

    def plain(annotation: Any) -> Any:
        if annotation is inspect.Parameter.empty:
            return annotation
        if isinstance(annotation, str):
            text = annotation
        else:  # a NamedTuple's fields hold `ForwardRef('...')`
            text = getattr(annotation, "__forward_arg__", None) or inspect.formatannotation(
                annotation
            )
        return _Annotation(text)

    sig = sig.replace(
        parameters=[p.replace(annotation=plain(p.annotation)) for p in sig.parameters.values()],
        return_annotation=plain(sig.return_annotation),
    )
    one_line = _clean(f"{name}{sig}")
    if len(one_line) <= WIDTH:
        return one_line
    params = _clean(str(sig.replace(return_annotation=inspect.Signature.empty)))[1:-1]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(params):  # split on top-level commas only
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(params[start:i].strip())
            start = i + 1
    parts.append(params[start:].strip())
    ret = "" if sig.return_annotation is inspect.Signature.empty else f" -> {sig.return_annotation}"
    return f"{name}(\n" + "".join(f"    {p},\n" for p in parts) + f"){ret}"


def _entry(name: str, obj: Any, heading: str = "###") -> list[str]:
    kind = "class" if inspect.isclass(obj) else "function"
    return [
        f"{heading} `{name}`",
        "",
        "```python",
        (f"class {signature(name, obj)}" if kind == "class" else signature(name, obj)),
        "```",
        "",
        first_paragraph(obj),
        "",
    ]


def _describe_factory(factory: Any) -> str:
    if isinstance(factory, functools.partial):
        args = [repr(a) for a in factory.args] + [f"{k}={v!r}" for k, v in factory.keywords.items()]
        return f"`{factory.func.__name__}({', '.join(args)})`"
    return f"`{factory.__name__}()`"


def aggregation_section() -> list[str]:
    import fedjax_lora.aggregation as agg

    lines = [
        "## Aggregation (`fedjax_lora.aggregation`)",
        "",
        first_paragraph(agg),
        "",
        "### Registered aggregators (`AGGREGATORS`)",
        "",
        "| name | factory | battery properties |",
        "|---|---|---|",
    ]
    for name, entry in sorted(agg.AGGREGATORS.items()):
        lines.append(
            f"| `{name}` | {_describe_factory(entry.factory)} | "
            f"{', '.join(sorted(entry.properties))} |"
        )
    lines.append("")
    for info in sorted(pkgutil.iter_modules(agg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{agg.__name__}.{info.name}")
        public = [
            n
            for n in getattr(module, "__all__", [])
            if inspect.isfunction(getattr(module, n)) or inspect.isclass(getattr(module, n))
        ]
        if not public:
            continue
        lines += [f"### `{module.__name__}`", "", first_paragraph(module), ""]
        for name in sorted(public):
            lines += _entry(name, getattr(module, name), "####")
    return lines


def methods_section() -> list[str]:
    from fedjax_lora.algorithms.registry import METHODS

    lines = [
        "## Methods (`fedjax_lora.algorithms.registry.METHODS`)",
        "",
        "Each method is registered once (`register(name, factory, options)`): a factory "
        "`(problem, options) -> Algorithm(init, round, evaluate)` and its default options, one "
        "frozen dataclass. `fedjax-lora methods` lists them with their options and configs name "
        "them in `methods:`; each option is set as `method_options.<method>.<option>` (dotted "
        "keys: fields of a nested dataclass).",
        "",
    ]
    for name, spec in sorted(METHODS.items()):
        factory = spec.factory.func if isinstance(spec.factory, functools.partial) else spec.factory
        options = type(spec.options)
        lines += [
            f"### `{name}`",
            "",
            f"{spec.doc}. Factory `{factory.__module__}.{factory.__name__}`, options "
            f"`{options.__module__}.{options.__name__}`.",
            "",
        ]
        lines += options_table(spec.options)
    return lines


def options_table(options: Any) -> list[str]:
    """The method's options (`method_options.<method>.<key>`) with types and defaults, nested
    dataclasses field by field (`fedjax_lora.options.option_list`)."""
    from fedjax_lora.options import option_list

    listed = option_list(options)
    if not listed:
        return ["No options.", ""]
    cell = lambda text: f"`{text}`".replace("|", "\\|") if text else ""
    return [
        "| option | type | default |",
        "|---|---|---|",
        *(f"| {cell(o.key)} | {cell(o.type)} | {cell(o.default)} |" for o in listed),
        "",
    ]


def sources_section() -> list[str]:
    """The data-source registry: `register_source` and every registered source with its doc,
    builder and the `data.*` fields it reads."""
    from fedjax_lora.experiment import sources

    lines = [
        "## Data sources (`fedjax_lora.experiment.sources.SOURCES`)",
        "",
        first_paragraph(sources),
        "",
        "| `data.source` | what it is | builder | reads | supports |",
        "|---|---|---|---|---|",
    ]
    for name, spec in sources.SOURCES.items():
        builder = spec.builder
        if isinstance(builder, functools.partial):
            args = [f"{k}={getattr(v, '__name__', repr(v))}" for k, v in builder.keywords.items()]
            builder = f"`{builder.func.__name__}({', '.join(args)})`"
        else:
            builder = f"`{builder.__name__}`"
        reads = ", ".join(f"`{field}`" for field in spec.fields)
        supports = ", ".join(f"`{setting}`" for setting in spec.supports)
        lines.append(f"| `{name}` | {spec.doc} | {builder} | {reads} | {supports} |")
    lines.append("")
    for name in ("register_source", "SourceSpec", "checked_source"):
        lines += _entry(name, getattr(sources, name))
    return lines


def export_section() -> list[str]:
    """`fedjax_lora.export`: the module's description (with the `fedjax-lora export` command) and
    its public functions."""
    from fedjax_lora import export

    doc = inspect.getdoc(export) or ""
    lines = ["## Export (`fedjax_lora.export`)", ""]
    for paragraph in doc.split("\n\n"):
        lines += [" ".join(paragraph.split()), ""]
    for name in export.__all__:
        lines += _entry(name, getattr(export, name))
    return lines


def render() -> str:
    """The whole of `docs/api.md`."""
    header = [
        "# API reference: aggregators, methods, data sources and export",
        "",
        "<!-- Generated by scripts/make_api_docs.py; do not edit by hand. -->",
        "",
        "Signatures and the first paragraph of each docstring; the docstrings hold the formulas "
        "and papers. Writing your own rule: `docs/adding_a_method.md` and "
        "`colab/aggregation_rules.ipynb`.",
        "",
    ]
    sections = aggregation_section() + methods_section() + sources_section() + export_section()
    return "\n".join(header + sections).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is stale; run python scripts/make_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
