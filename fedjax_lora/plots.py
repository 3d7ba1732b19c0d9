"""Figures of a run: per-client perplexity over rounds, perplexity against the bytes exchanged,
trust (mixing) matrices, FedAMoLE's expert assignment.

Each function builds a `matplotlib.figure.Figure` directly (no `pyplot`, no backend switch, so it
is safe in scripts, threads and notebooks alike), saves it to `path` when given and returns it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, ScalarFormatter

__all__ = ["plot_bytes", "plot_expert_assignment", "plot_history", "plot_trust"]


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _grid(fig: Figure, n: int, max_cols: int = 3, **kw) -> list:
    """`n` axes in rows of at most `max_cols` (unused cells hidden), row-major."""
    cols = min(n, max_cols)
    rows = -(-n // cols)
    axes = fig.subplots(rows, cols, squeeze=False, **kw).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _group_colors(num_clients: int, groups: Sequence[int] | None) -> list:
    """One colour per client: by group (tab10) when `groups` is given, else by client."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if groups is not None or num_clients <= 10 else "tab20"]
    keys = list(groups) if groups is not None else list(range(num_clients))
    return [cmap(int(k) % cmap.N) for k in keys]


def plot_history(
    history: dict[str, list[dict[str, Any]]],
    path: str | Path | None = None,
    split: str = "val",
    *,
    groups: Sequence[int] | None = None,
    max_cols: int = 3,
) -> Figure:
    """Per-client perplexity over rounds (thin lines, coloured by client group when `groups`
    gives each client's group) and their mean (black), one panel per method in rows of
    `max_cols`, shared axes; `history` maps a method to its round records (`metrics.jsonl`)."""
    methods = list(history)
    cols = min(len(methods), max_cols)
    rows = -(-len(methods) // cols)
    fig = Figure(figsize=(3.6 * cols + 1.2, 2.9 * rows + 0.6), layout="constrained")
    axes = _grid(fig, len(methods), max_cols, sharex=True, sharey=True)
    handles = {}
    for ax, method in zip(axes, methods, strict=True):
        rounds = [r["round"] for r in history[method]]
        ppl = np.asarray([r[f"{split}_ppl"] for r in history[method]])
        colors = _group_colors(ppl.shape[1], groups)
        for c in range(ppl.shape[1]):
            (line,) = ax.plot(rounds, ppl[:, c], lw=1, alpha=0.75, color=colors[c])
            label = f"group {groups[c]}" if groups is not None else None
            if label:
                handles.setdefault(label, line)
        (mean,) = ax.plot(rounds, ppl.mean(1), "k-", lw=2)
        handles.setdefault("mean over clients", mean)
        ax.set_title(f"{method}: mean {ppl[-1].mean():.2f}", fontsize=10)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.2)
    for i, ax in enumerate(axes):
        if i + cols >= len(axes):  # no panel below: this one carries the round axis
            ax.set_xlabel("round")
            ax.xaxis.set_tick_params(labelbottom=True)
        if i % cols == 0:
            ax.set_ylabel(f"{split} perplexity (log)")
    note = "" if groups is not None else " (one line per client)"
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8)
    fig.suptitle(f"Per-client {split} perplexity over rounds{note}", fontsize=11)
    return _save(fig, path)


def plot_bytes(
    history: dict[str, list[dict[str, Any]]],
    path: str | Path | None = None,
    split: str = "val",
) -> Figure:
    """Mean `split` perplexity over clients against the cumulative bytes exchanged (uploads and
    downloads of all clients, `cumulative_bytes` of the round records), one line per method with
    a marker per round, on one panel; a method that exchanges nothing sits at 0 bytes (shown at
    the left edge of the log axis, as a dashed level)."""
    exchanging = [m for m, rs in history.items() if rs[-1].get("cumulative_bytes", 0) > 0]
    ncol = 1 + (len(exchanging) - 1) // 18  # legend columns right of the panel, 18 rows each
    rows = -(-len(exchanging) // ncol) if exchanging else 0
    fig = Figure(figsize=(6.4 + 1.6 * ncol, max(3.8, 0.75 + 0.2 * rows)), layout="constrained")
    ax = fig.subplots()
    for method, records in history.items():
        ppl = [np.mean(r[f"{split}_ppl"]) for r in records]
        if method not in exchanging:
            ax.axhline(ppl[-1], ls="--", lw=1, color="0.4")
            ax.annotate(
                f"{method} (no exchange)",
                (0.01, ppl[-1]),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                va="bottom",
                color="0.3",
            )
            continue
        sent = [r["cumulative_bytes"] / 1e6 for r in records]
        ax.plot(sent[1:], ppl[1:], "o-", ms=3, lw=1.5, label=method)
    if exchanging:
        ax.set_xscale("log")
        totals = [r["cumulative_bytes"] for m in exchanging for r in history[m][1:]]
        totals = [t for t in totals if t > 0]  # warm-up rounds before the first exchange: 0
        decades = np.log10(max(totals) / min(totals))
        # Minor ticks labelled: all within one decade, 2 and 5 up to three, none beyond.
        shown = (1, 2, 3, 4, 5, 6, 7, 8, 9) if decades < 1 else (2, 5) if decades < 3 else ()
        mantissa = lambda v: round(v / 10 ** np.floor(np.log10(v)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(
            FuncFormatter(lambda v, _: f"{v:g}" if mantissa(v) in shown else "")
        )
        ax.tick_params(axis="x", which="both", labelsize=7)
        fig.legend(fontsize=7, loc="outside right upper", ncol=ncol)
    ax.set_xlabel("cumulative MB exchanged (all clients, up + down; log)")
    ax.set_ylabel(f"mean {split} perplexity")
    ax.grid(True, which="both", alpha=0.2)
    fig.suptitle(f"Mean {split} perplexity against communication (one marker per round)")
    return _save(fig, path)


def plot_trust(
    matrices: dict[str, np.ndarray],
    client_names: Sequence[str],
    path: str | Path | None = None,
    title: str = "",
    *,
    max_cols: int = 3,
) -> Figure:
    """Heatmaps of `N × N` mixing matrices in rows of `max_cols` panels: row `i` holds the
    weights client `i` gives each client `j` when it aggregates (rows sum to 1)."""
    n = len(matrices)
    cols = min(n, max_cols)
    rows = -(-n // cols)
    size = 2.4 + 0.12 * len(client_names)
    fig = Figure(figsize=(size * cols + 1.0, size * rows + 0.6), layout="constrained")
    axes = _grid(fig, n, max_cols)
    ticks = np.arange(len(client_names))
    fontsize = 7 if len(client_names) <= 16 else 5
    for ax, (method, w) in zip(axes, matrices.items(), strict=True):
        im = ax.imshow(w, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(method, fontsize=10)
        ax.set_xticks(ticks, list(client_names), rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks, list(client_names), fontsize=fontsize)
        ax.set_xlabel("client j (weight received)", fontsize=8)
        ax.set_ylabel("client i (aggregating)", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="weight of client j in client i's model")
    fig.suptitle(title or "Final mixing (trust) matrices: row i = the weights client i uses")
    return _save(fig, path)


def plot_expert_assignment(
    assign: np.ndarray | Mapping[str, np.ndarray],
    client_names: Sequence[str],
    path: str | Path | None = None,
    *,
    module_names: Sequence[str] | None = None,
    max_modules: int = 6,
    max_cols: int = 3,
    title: str = "",
) -> Figure:
    """FedAMoLE's expert assignment (RSEA, `fedjax_lora.aggregation.rsea`): which client holds
    which domain expert.

    assign: `bool [M, E, C]` (per AMoLE module, `X[e, c] = 1` when client `c` holds expert `e`)
      or `bool [E, C]` (one module); a mapping `{label: assign}` (e.g. per method) gives one row
      per label.
    Panels in rows of at most `max_cols`, one block of rows per assignment: with several modules,
    the first panel counts the modules in which client `c` holds expert `e` (`Σ_m X_m`), followed
    by the first `max_modules` modules (titled by `module_names` when given).
    """
    rows = dict(assign) if isinstance(assign, Mapping) else {"": assign}
    arrays = {}
    for label, x in rows.items():
        x = np.asarray(x, bool)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3:
            raise ValueError(
                f"assign{f'[{label!r}]' if label else ''} must be bool [M, E, C] or [E, C], "
                f"got shape {x.shape}"
            )
        if x.shape[2] != len(client_names):
            raise ValueError(
                f"assign has {x.shape[2]} clients on its last axis but {len(client_names)} "
                "client_names were given"
            )
        arrays[label] = x
    num_modules = max(x.shape[0] for x in arrays.values())
    if module_names is not None and len(module_names) != num_modules:
        raise ValueError(f"{len(module_names)} module_names for {num_modules} modules")
    shown = min(num_modules, max_modules)
    cols = min(shown + (num_modules > 1), max_cols)
    per_label = -(-(shown + (num_modules > 1)) // cols)  # rows of panels per assignment
    fig = Figure(
        figsize=(1.4 + (0.8 + 0.2 * len(client_names)) * cols, 0.8 + 2.4 * per_label * len(arrays)),
        layout="constrained",
    )
    grid = fig.subplots(per_label * len(arrays), cols, squeeze=False)
    ticks = np.arange(len(client_names))
    for k, (label, x) in enumerate(arrays.items()):
        axes = grid[k * per_label : (k + 1) * per_label].ravel().tolist()
        panels = []
        if num_modules > 1:
            panels.append((f"all {x.shape[0]} modules: count", x.sum(0), "viridis"))
        for m in range(min(x.shape[0], shown)):
            name = module_names[m] if module_names is not None else f"module {m}"
            panels.append((name, x[m], "Greys"))
        for i, (ax, (panel_title, values, cmap)) in enumerate(zip(axes, panels, strict=False)):
            im = ax.imshow(values, cmap=cmap, vmin=0, vmax=max(1, int(values.max())), aspect="auto")
            ax.set_title(panel_title, fontsize=8)
            ax.set_xticks(ticks, list(client_names), rotation=90, fontsize=6)
            ax.set_yticks(np.arange(values.shape[0]))
            ax.tick_params(axis="y", labelsize=6)
            ax.set_xlabel("client", fontsize=7)
            if i % cols == 0:
                ax.set_ylabel(f"{label}\nexpert" if label else "expert", fontsize=8)
            if cmap == "viridis":
                fig.colorbar(
                    im, ax=ax, shrink=0.8, label="modules holding it"
                ).locator = MaxNLocator(integer=True)
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
    hidden = num_modules - shown
    fig.suptitle(
        (title or "expert assignment (dark: the client holds the expert)")
        + (f"; {hidden} more module(s) not shown" if hidden > 0 else "")
    )
    return _save(fig, path)
