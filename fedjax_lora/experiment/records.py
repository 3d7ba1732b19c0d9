"""What a run records: one round's record for `metrics.jsonl` (`_round_record`, `method_metric`)
with its costs (`round_costs`: the bytes each client uploaded and downloaded, the method's
`ServerProgram.comm`, and their running totals; under client-level DP the `ε` spent so far at `δ`,
`fedjax_lora.aggregation.privacy`), the method's final analyses, and a finished run's summary,
results table and figures (`write_results`, `fedjax_lora.plots`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from fedjax_lora.algorithms import Algorithm, Problem, SimState
from fedjax_lora.config import ExperimentConfig
from fedjax_lora.distributed import host
from fedjax_lora.engine.evaluate import EvalSet
from fedjax_lora.experiment.problem import SPLITS, base_tokenizer
from fedjax_lora.experiment.sources import get_source, text_tokenizer
from fedjax_lora.plots import plot_bytes, plot_expert_assignment, plot_history, plot_trust
from fedjax_lora.tracking import json_safe


def _round_record(method: str, round_idx: int, metrics: dict, seconds: float) -> dict[str, Any]:
    """One round's record for `metrics.jsonl`: the clients' last training loss (`train_loss`),
    the `cohort`, whether the server aggregated (`aggregated`) and its mixing matrix (`trust`),
    per-client and mean `loss`/`ppl`/`accuracy`/`rouge_l` of every evaluation set
    (`val_ppl`, `val_mean_ppl`, ...), and every other metric the method's programs return,
    namespaced by the method (`fdlora/fusion_weights`, `comigs/train_ce`; `method_metric`)."""
    record: dict[str, Any] = {"method": method, "round": round_idx, "seconds": seconds}
    if "train" in metrics:
        train = metrics["train"]
        record["train_loss"] = np.asarray(train["train_loss"])[:, -1].tolist()
        if "cohort" in train:
            record["cohort"] = np.asarray(train["cohort"]).tolist()
        for key, value in train.items():
            if key not in ("train_loss", "cohort"):
                record[f"{method}/{key}"] = method_metric(value)
    if "aggregation" in metrics:
        agg = metrics["aggregation"]
        record["aggregated"] = bool(agg["applied"])
        if "matrix" in agg:
            record["trust"] = np.asarray(agg["matrix"], np.float64).tolist()
        for key, value in agg.items():
            if key not in ("applied", "matrix"):
                record[f"{method}/{key}"] = method_metric(value)
    for split, values in metrics.items():
        if split in ("train", "aggregation"):
            continue
        for key in ("ppl", "loss", "accuracy", "rouge_l"):
            if key not in values:  # a text task reports accuracy or rouge_l only
                continue
            per_client = np.asarray(values[key], np.float64)
            record[f"{split}_{key}"] = per_client.tolist()
            record[f"{split}_mean_{key}"] = float(per_client.mean())
    return record


def method_metric(value: Any) -> Any:
    """A method's metric as JSON: an array as (nested) lists, its leading axis the clients
    (`[N, steps]` training series, `[N, 2]` fusion weights); a nested mapping key by key."""
    if isinstance(value, dict):
        return {k: method_metric(v) for k, v in value.items()}
    array = np.asarray(value)
    if array.dtype == bool:
        return array.tolist()
    return array.astype(np.float64).tolist()


Costs = Callable[[dict[str, Any], dict[str, Any] | None], dict[str, Any]]


def round_costs(algo: Algorithm, problem: Problem, sim: SimState) -> Costs:
    """`costs(record, previous) -> fields` of a round record (`previous`: the record before it,
    None for round 0), for `algo` on `problem` from its initial state `sim`:

    - `upload_bytes`, `download_bytes`: per client `[N]`, what the method moves in a round that
      aggregates (`ServerProgram.comm`), 0 for clients outside the round's cohort and in rounds
      without aggregation; `cumulative_upload_bytes`, `cumulative_download_bytes`,
      `cumulative_bytes`: their totals over clients and rounds so far;
    - with client-level DP (`ServerProgram.dp`): `epsilon` after the `dp_rounds` aggregations so
      far at `delta`, from `aggregation.privacy.epsilon` with `K = data.cohort_size` of `N`."""
    from fedjax_lora.aggregation import privacy

    server = algo.method.server if algo.method is not None else None
    exchange = None
    if server and server.comm:  # the bytes follow the adapters' and frozen state's shapes
        clients = sim.clients
        exchange = server.comm(
            clients._replace(params=host(clients.params), frozen=host(clients.frozen))
        )
    dp = server.dp if server is not None else None
    n = problem.num_clients
    k = None if problem.cohort is None else problem.cohort.size

    def costs(record: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
        previous, out = previous or {}, {}
        applied = bool(record.get("aggregated", False))
        if exchange is not None:
            rows = np.asarray(record.get("cohort", np.arange(n)), int)
            up, down = np.zeros(n, np.int64), np.zeros(n, np.int64)
            if applied:  # a pooled model (centralized) has one row for everyone
                up[rows] = np.broadcast_to(exchange.upload, (n,))[rows]
                down[rows] = np.broadcast_to(exchange.download, (n,))[rows]
            total_up = previous.get("cumulative_upload_bytes", 0) + int(up.sum())
            total_down = previous.get("cumulative_download_bytes", 0) + int(down.sum())
            out |= {
                "upload_bytes": up.tolist(),
                "download_bytes": down.tolist(),
                "cumulative_upload_bytes": total_up,
                "cumulative_download_bytes": total_down,
                "cumulative_bytes": total_up + total_down,
            }
        if dp is not None:
            rounds = previous.get("dp_rounds", 0) + applied
            eps = 0.0
            if rounds:
                z = dp.noise_multiplier
                eps = privacy.epsilon(z, n, k, rounds, dp.delta, dp.sampling)
            out |= {"dp_rounds": rounds, "epsilon": eps, "delta": dp.delta}
        return out

    return costs


def scored(metrics: dict, problem: Problem) -> dict:
    """The round's metrics on the host, a text task's generated tokens scored (ROUGE-L)."""
    from fedjax_lora.engine.instruction import score_task

    metrics = host(metrics)
    if problem.task is None:
        return metrics
    tasks = {k for k, v in problem.eval_sets.items() if not isinstance(v, EvalSet)}
    return {k: score_task(v, problem.task) if k in tasks else v for k, v in metrics.items()}


def final_analyses(
    algo: Algorithm, config: ExperimentConfig, problem: Problem, sim: SimState
) -> dict[str, Any]:
    """What the last record of a run adds: the method's own analyses (`Method.analyses`, e.g.
    FedAMoLE's `experts`, the CoMiGS family's `routing`), token ids decoded with the base's
    tokenizer for text data (UTF-8 bytes for a base without one; ids for the synthetic corpus)."""
    method = algo.method
    if method is None or method.analyses is None:
        return {}
    tokenizer = base_tokenizer(config)
    if tokenizer is None and get_source(config.data.source).text:
        vocab = nnx.merge(problem.graphdef, problem.template, problem.base).config.vocab_size
        tokenizer = text_tokenizer(config, None, vocab)
    return method.analyses(sim, tokenizer)


def summarize(
    history: dict[str, list[dict[str, Any]]], client_names, groups: list[int] | None = None
) -> dict[str, Any]:
    """Per method: final mean and per-client perplexity (test and validation splits); with
    `groups` (the data's client groups), `client_groups` too; the bytes exchanged
    (`total_upload_bytes`, `total_download_bytes`, `total_bytes` over clients and rounds, and
    `upload_bytes_per_client_round`, `download_bytes_per_client_round`: the mean of a client
    taking part in a round) when recorded; `epsilon` and `delta` of a run with client-level DP."""
    summary = {}
    for method, records in history.items():
        last = records[-1]
        costs = {}
        if "cumulative_bytes" in last:
            taking_part = sum(len(r.get("cohort", r["upload_bytes"])) for r in records[1:])
            costs = {
                "total_upload_bytes": last["cumulative_upload_bytes"],
                "total_download_bytes": last["cumulative_download_bytes"],
                "total_bytes": last["cumulative_bytes"],
                "upload_bytes_per_client_round": last["cumulative_upload_bytes"]
                / max(taking_part, 1),
                "download_bytes_per_client_round": last["cumulative_download_bytes"]
                / max(taking_part, 1),
            }
        if "epsilon" in last:
            costs |= {"epsilon": last["epsilon"], "delta": last["delta"]}
        summary[method] = {
            "rounds": last["round"],
            "client_names": list(client_names),
            **({"client_groups": list(groups)} if groups is not None else {}),
            **{
                f"{split}_{what}": last[f"{split}_{what}"]
                for split in SPLITS
                for what in ("mean_ppl", "ppl", "mean_accuracy")
            },
            **{k: v for k, v in last.items() if k.startswith("task_")},
            **costs,
        }
    return summary


def final_trust(
    history: dict[str, list[dict[str, Any]]], num_clients: int
) -> dict[str, np.ndarray]:
    """Per method, the `num_clients × num_clients` mixing matrix of its last aggregated round
    (methods that never aggregated with such a matrix, e.g. centralized training of one model,
    are left out)."""
    out = {}
    for method, records in history.items():
        mixed = [r["trust"] for r in records if r.get("aggregated") and "trust" in r]
        if mixed and np.shape(mixed[-1]) == (num_clients, num_clients):
            out[method] = np.asarray(mixed[-1])
    return out


def final_experts(
    history: dict[str, list[dict[str, Any]]],
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per method with an assignment in its last record, `bool [M, E, C]` (modules in record
    order, expert axes padded with False to the largest pool), and the module names."""
    found = {
        m: records[-1]["experts"] for m, records in history.items() if records[-1].get("experts")
    }
    if not found:
        return {}, []
    modules = list(next(iter(found.values())))
    size = max(len(x) for held in found.values() for x in held.values())
    out = {}
    for method, held in found.items():
        x = [np.asarray(held[module], bool) for module in modules]
        out[method] = np.stack([np.pad(a, ((0, size - a.shape[0]), (0, 0))) for a in x])
    return out, modules


def results_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The results table's header and rows: final mean perplexities and accuracy per method,
    the megabytes exchanged (all clients, up and down, whole run) when recorded, and `ε` at `δ`
    when a method ran with client-level DP (`-` for the others)."""
    header = ["method", "val ppl (mean)", "test ppl (mean)", "test accuracy"]
    has_bytes = any("total_bytes" in s for s in summary.values())
    has_dp = any("epsilon" in s for s in summary.values())
    header += ["MB exchanged"] * has_bytes + ["ε (δ)"] * has_dp
    rows = []
    for method, s in summary.items():
        row = [
            method,
            f"{s['val_mean_ppl']:.3f}",
            f"{s['test_mean_ppl']:.3f}",
            f"{s['test_mean_accuracy']:.3f}",
        ]
        if has_bytes:
            row.append(f"{s['total_bytes'] / 1e6:.3f}" if "total_bytes" in s else "-")
        if has_dp:
            row.append(f"{s['epsilon']:.3g} ({s['delta']:g})" if "epsilon" in s else "-")
        rows.append(row)
    return header, rows


def results_table(summary: dict[str, Any]) -> str:
    """A Markdown table of `results_rows`."""
    header, rows = results_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_results(
    out: Path, problem: Problem, groups: list | None, history: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """A finished run's `summary.json`, `results.md` and figures under `out`; returns the
    summary."""
    summary = summarize(history, problem.client_names, groups)
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    (out / "results.md").write_text(results_table(summary) + "\n")
    plot_history(history, out / "ppl.png", groups=groups)
    if any("cumulative_bytes" in records[-1] for records in history.values()):
        plot_bytes(history, out / "bytes.png")
    trust = final_trust(history, problem.num_clients)
    if trust:
        plot_trust(trust, problem.client_names, out / "trust.png")
    experts, modules = final_experts(history)
    if experts:
        plot_expert_assignment(
            experts, problem.client_names, out / "experts.png", module_names=modules
        )
    for method, records in history.items():
        routing = records[-1].get("routing")
        if routing:
            from fedjax_lora.moe import plot_routing_shares

            plot_routing_shares(
                np.asarray(routing["shares"]),
                problem.client_names,
                out / f"routing_{method}.png",
                layers=routing["layers"],
                title=f"{method}: generalist share of the routing weight",
            )
    return summary
