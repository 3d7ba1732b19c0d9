"""`fedjax-lora report RUN_DIR`: a Markdown or self-contained HTML report of a finished run — the
results table, per-client perplexities and the figures: perplexity curves, trust matrices and
expert assignments rebuilt from `metrics.jsonl`, then every other figure file the run directory
holds (e.g. `routing.png` of a routing analysis)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from fedjax_lora.experiment import (
    final_experts,
    final_trust,
    results_rows,
    results_table,
    summarize,
)
from fedjax_lora.plots import plot_bytes, plot_expert_assignment, plot_history, plot_trust

FIGURE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
}
"""Figure files a report includes, by suffix, with their MIME type (for the HTML data URIs)."""


def load_history(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Round records per method from `metrics.jsonl`, in round order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} the --out of a finished run?")
    history: dict[str, dict[int, dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        history.setdefault(record["method"], {})[record["round"]] = record
    return {m: [rounds[r] for r in sorted(rounds)] for m, rounds in history.items()}


CAPTIONS = {
    "ppl.png": "One panel per method: thin lines are the clients (coloured by their data group "
    "when the data has groups), the black line their mean; lower is better, the panel title "
    "gives the final mean.",
    "trust.png": "Row i holds the weights client i gives each client j when it aggregates (rows "
    "sum to 1): local training is the identity, FedAvg is uniform; a personalised method that "
    "finds the clients with similar data shows blocks.",
    "bytes.png": "Mean validation perplexity over clients against the megabytes all clients "
    "uploaded and downloaded so far (log axis), one marker per round: further left at the same "
    "height is cheaper; a method that exchanges nothing is a dashed level.",
    "experts.png": "Dark cell: client c holds domain expert e after the RSEA assignment "
    "(FedAMoLE); the first panel counts the modules.",
}
"""Captions of the figures a run writes, by file name (`routing_<method>.png`: `_caption`)."""


def _caption(path: Path) -> str:
    if path.name.startswith("routing_"):
        return (
            "Share of the routing weight that goes to the generalist (shared) expert, per client "
            "and layer (CoMiGS): high where clients' data is common, low where it is specific."
        )
    return CAPTIONS.get(path.name, "")


def _model_description(config: dict[str, Any]) -> str:
    """`model <source>`, or the sizes of the tiny random base the run built."""
    model = config.get("model", {})
    if model.get("source"):
        return f"model {model['source']}"
    if not model:
        return "model ?"
    return (
        f"tiny random {model.get('family', '?')} base (d_model {model.get('d_model', '?')}, "
        f"{model.get('n_layers', '?')} layers, vocabulary {model.get('vocab_size', '?')}, "
        "not pretrained)"
    )


def _client_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    methods = list(summary)
    names = summary[methods[0]]["client_names"]
    rows = [
        [name, *(f"{summary[m]['test_ppl'][i]:.3f}" for m in methods)]
        for i, name in enumerate(names)
    ]
    return ["client", *methods], rows


def write_report(run_dir: str | Path, fmt: str = "md") -> Path:
    """Writes `report.md` or `report.html` (figures embedded) in `run_dir`; returns its path."""
    if fmt not in ("md", "html"):
        raise ValueError(f"report format must be 'md' or 'html', got {fmt!r}")
    run = Path(run_dir)
    if not (run / "metrics.jsonl").is_file() and (run / "results.json").is_file():
        runs = sorted(str(p.parent) for p in run.glob("*/seed*/metrics.jsonl"))
        raise FileNotFoundError(
            f"{run} is a grid: its table is {run / 'results.md'}; report one of its runs, e.g. "
            f"fedjax-lora report {runs[0] if runs else str(run / '<cell>/seed<s>')} "
            f"({len(runs)} runs)"
        )
    history = load_history(run)
    config = (
        json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    )
    summary_path = run / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        names = next(iter(summary.values()))["client_names"]
    else:  # a run stopped early: summarise what was logged
        last = next(iter(history.values()))[-1]
        names = [f"client {i}" for i in range(len(last["test_ppl"]))]
        summary = summarize(history, names)
    groups = next(iter(summary.values())).get("client_groups")
    figures = {"Per-client validation perplexity over rounds": run / "ppl.png"}
    plot_history(history, figures["Per-client validation perplexity over rounds"], groups=groups)
    if any("cumulative_bytes" in records[-1] for records in history.values()):
        figures["Perplexity against communication"] = run / "bytes.png"
        plot_bytes(history, figures["Perplexity against communication"])
    trust = final_trust(history, len(names))
    if trust:
        figures["Final mixing (trust) matrices"] = run / "trust.png"
        plot_trust(trust, names, figures["Final mixing (trust) matrices"])
    experts, modules = final_experts(history)
    if experts:
        figures["Final expert assignment (FedAMoLE, RSEA)"] = run / "experts.png"
        plot_expert_assignment(experts, names, run / "experts.png", module_names=modules)
    known = set(figures.values())
    for path in sorted(run.iterdir()):
        if path.suffix.lower() in FIGURE_TYPES and path.is_file() and path not in known:
            figures[f"{path.stem.replace('_', ' ')} ({path.name})"] = path
    header, rows = _client_table(summary)
    title = f"fedjax_lora run: {run.name}"
    setting = (
        f"methods {', '.join(history)}; {config.get('rounds', '?')} rounds; "
        f"{_model_description(config)}; "
        f"data {config.get('data', {}).get('source', '?')}"
    )
    if fmt == "md":
        lines = [
            f"# {title}",
            "",
            setting,
            "",
            "## Results",
            "",
            results_table(summary),
            "",
            "## Test perplexity per client",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        for caption, path in figures.items():
            lines += ["", f"## {caption}", "", f"![{caption}]({path.name})"]
            lines += ["", f"*{_caption(path)}*"] if _caption(path) else []
        out = run / "report.md"
        out.write_text("\n".join(lines) + "\n")
        return out

    def table(head, body):
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body
        )
        return f"<table><tr>{th}</tr>{trs}</table>"

    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(setting)}</p>",
        "<h2>Results</h2>",
        table(*results_rows(summary)),
        "<h2>Test perplexity per client</h2>",
        table(header, rows),
    ]
    for caption, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode()
        mime = FIGURE_TYPES[path.suffix.lower()]
        parts += [
            f"<h2>{html.escape(caption)}</h2>",
            f'<img alt="{html.escape(caption)}" src="data:{mime};base64,{data}">',
            f"<p><em>{html.escape(_caption(path))}</em></p>" if _caption(path) else "",
        ]
    style = "table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 8px}"
    out = run / "report.html"
    out.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    return out
