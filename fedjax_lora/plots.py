"""Figures of a run: per-client perplexity over rounds, trust (mixing) matrices, FedAMoLE's expert
assignment.

Each function builds a `matplotlib.figure.Figure` directly (no `pyplot`, no backend switch, so it
is safe in scripts, threads and notebooks alike), saves it to `path` when given and returns it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["plot_expert_assignment", "plot_history", "plot_trust"]


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_history(
    history: dict[str, list[dict[str, Any]]], path: str | Path | None = None, split: str = "val"
) -> Figure:
    """Per-client perplexity over rounds (thin lines) and their mean (black), one panel per
    method; `history` maps a method to its round records (`metrics.jsonl`)."""
    methods = list(history)
    fig = Figure(figsize=(4 * len(methods), 3.2))
    axes = fig.subplots(1, len(methods), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods, strict=True):
        rounds = [r["round"] for r in history[method]]
        ppl = np.asarray([r[f"{split}_ppl"] for r in history[method]])
        for c in range(ppl.shape[1]):
            ax.plot(rounds, ppl[:, c], lw=1, alpha=0.7)
        ax.plot(rounds, ppl.mean(1), "k-", lw=2, label="mean")
        ax.set_title(method)
        ax.set_xlabel("round")
        ax.set_yscale("log")
    axes[0][0].set_ylabel(f"{split} perplexity per client")
    axes[0][0].legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_trust(
    matrices: dict[str, np.ndarray],
    client_names: Sequence[str],
    path: str | Path | None = None,
    title: str = "",
) -> Figure:
    """Heatmaps of `N × N` mixing matrices side by side (row `i`: the weights client `i` uses)."""
    n = len(matrices)
    fig = Figure(figsize=(3.4 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, (method, w) in zip(axes[0], matrices.items(), strict=True):
        im = ax.imshow(w, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(method)
        ticks = np.arange(w.shape[0])
        ax.set_xticks(ticks, list(client_names), rotation=90, fontsize=6)
        ax.set_yticks(ticks, list(client_names), fontsize=6)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_expert_assignment(
    assign: np.ndarray | Mapping[str, np.ndarray],
    client_names: Sequence[str],
    path: str | Path | None = None,
    *,
    module_names: Sequence[str] | None = None,
    max_modules: int = 6,
    title: str = "",
) -> Figure:
    """FedAMoLE's expert assignment (RSEA, `fedjax_lora.aggregation.rsea`): which client holds
    which domain expert.

    assign: `bool [M, E, C]` (per AMoLE module, `X[e, c] = 1` when client `c` holds expert `e`)
      or `bool [E, C]` (one module); a mapping `{label: assign}` (e.g. per method) gives one row
      per label.
    One row per assignment: with several modules, the first panel counts the modules in which
    client `c` holds expert `e` (`Σ_m X_m`), followed by the first `max_modules` modules
    (titled by `module_names` when given).
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
    cols = shown + (num_modules > 1)
    fig = Figure(
        figsize=(1.2 + 0.35 * len(client_names) * cols, 0.6 + 2.6 * len(arrays)),
        layout="constrained",
    )
    axes = fig.subplots(len(arrays), cols, squeeze=False)
    ticks = np.arange(len(client_names))
    for ax_row, (label, x) in zip(axes, arrays.items(), strict=True):
        panels = []
        if num_modules > 1:
            panels.append((f"all {x.shape[0]} modules: count", x.sum(0), "viridis"))
        for m in range(min(x.shape[0], shown)):
            name = module_names[m] if module_names is not None else f"module {m}"
            panels.append((name, x[m], "Greys"))
        for ax, (panel_title, values, cmap) in zip(ax_row, panels, strict=False):
            im = ax.imshow(values, cmap=cmap, vmin=0, vmax=max(1, int(values.max())), aspect="auto")
            ax.set_title(panel_title, fontsize=7)
            ax.set_xticks(ticks, list(client_names), rotation=90, fontsize=6)
            ax.set_yticks(np.arange(values.shape[0]))
            ax.tick_params(axis="y", labelsize=6)
            if cmap == "viridis":
                fig.colorbar(im, ax=ax, shrink=0.8).locator = MaxNLocator(integer=True)
        ax_row[0].set_ylabel(f"{label}\nexpert" if label else "expert", fontsize=8)
        for ax in ax_row[len(panels) :]:
            ax.set_visible(False)
    hidden = num_modules - shown
    fig.suptitle(
        (title or "expert assignment (dark: the client holds the expert)")
        + (f"; {hidden} more module(s) not shown" if hidden > 0 else "")
    )
    return _save(fig, path)
