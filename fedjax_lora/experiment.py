"""`train_and_evaluate`: build the problem from an `ExperimentConfig`, run every method, write
`metrics.jsonl`, `summary.json` and a plot."""

from __future__ import annotations

import functools
import inspect
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fedjax_lora import lora
from fedjax_lora.algorithms import Problem, get_method
from fedjax_lora.checkpoint import Checkpointer
from fedjax_lora.config import ExperimentConfig, to_dict
from fedjax_lora.data import FederatedData, eval_windows, stack_streams, synthetic_corpus
from fedjax_lora.data.streams import split_tail
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.factory import from_config
from fedjax_lora.tracking import open_trackers, require_wandb

SPLITS = ("val", "test")


def build_model(config: ExperimentConfig):
    """The base model with the config's LoRA attached, and its tokenizer (None for the tiny
    random base)."""
    spec = config.model
    dtype = jnp.dtype(spec.dtype)
    overrides = {
        k: getattr(spec, k)
        for k in ("dropout", "attn_dropout", "activation")
        if getattr(spec, k) is not None
    }
    if spec.source:
        from fedjax_lora import models

        model = models.load(spec.source, dtype=dtype, **overrides)
        tokenizer = models.load_tokenizer(spec.source)
    else:
        cfg = ModelConfig(
            family=spec.family,
            vocab_size=spec.vocab_size,
            d_model=spec.d_model,
            n_layers=spec.n_layers,
            n_heads=spec.n_heads,
            d_ff=spec.d_ff,
            max_positions=spec.max_positions,
            **overrides,
        )
        model, tokenizer = from_config(cfg, dtype=dtype, seed=spec.seed), None
    lora.add_lora(model, config.lora, key=jax.random.key(config.seed))
    return model, tokenizer


def build_data(config: ExperimentConfig, vocab_size: int, tokenizer=None) -> FederatedData:
    """The clients' data as the config describes it, validated for the sequence length."""
    spec = config.data
    seq = config.training.seq_len
    if spec.source == "synthetic":
        per_split = spec.tokens_per_client
        data = synthetic_corpus(
            spec.num_groups,
            spec.clients_per_group,
            vocab_size=vocab_size,
            overlap=spec.overlap,
            train_tokens=per_split,
            val_tokens=max(int(per_split * spec.val_fraction), seq + 1),
            test_tokens=max(int(per_split * spec.test_fraction), seq + 1),
            reference_shape=(spec.reference_sequences, seq),
            shared_eval_tokens=spec.shared_eval_tokens,
            seed=spec.seed,
        )
    elif spec.source == "fortunes":
        data = _fortunes_data(config, vocab_size, tokenizer)
    else:
        from fedjax_lora.data import trust_datasets

        data = trust_datasets.from_spec(
            spec, tokenizer=tokenizer, vocab_size=vocab_size, seq_len=seq
        )
    return data.validate(seq, vocab_size)


def _fortunes_data(config: ExperimentConfig, vocab_size: int, tokenizer) -> FederatedData:
    from fedjax_lora.data import build_federated, fortunes

    spec = config.data
    if tokenizer is None:
        raise ValueError(
            "data.source='fortunes' needs a real tokenizer: set model.source to a Hugging Face "
            "directory, hub id or .gguf file"
        )
    root = spec.fortunes_dir or fortunes.FORTUNES_ROOT
    if not spec.categories:
        raise ValueError("data.categories is empty; name fortune languages (en, de, ...) or topics")
    languages = set(fortunes.list_languages(root))
    clients, names, groups = [], [], []
    for g, category in enumerate(spec.categories):
        texts = (
            fortunes.load_language(category, root)
            if category in languages
            else fortunes.load_topic(category, "en", root)
        )
        rng = np.random.default_rng(spec.seed + g)
        order = rng.permutation(len(texts))
        for c in range(spec.clients_per_group):
            clients.append([texts[i] for i in order[c :: spec.clients_per_group]])
            names.append(f"{category}-{c}")
            groups.append(g)
    train = 1.0 - spec.val_fraction - spec.test_fraction
    return build_federated(
        clients,
        vocab_size=vocab_size,
        split=(train, spec.val_fraction, spec.test_fraction),
        tokenizer=tokenizer,
        client_names=names,
        groups=np.asarray(groups),
    )


def build_problem(config: ExperimentConfig) -> tuple[Problem, FederatedData]:
    """Model, adapters, data and evaluation windows assembled into a `Problem`."""
    for name in config.methods:
        get_method(name)  # unknown method names fail before any compute
    model, tokenizer = build_model(config)
    data = build_data(config, model.config.vocab_size, tokenizer)
    seq, ev = config.training.seq_len, config.eval
    train = data.train
    windows = {
        split: eval_windows(data.split(split), seq, ev.max_windows, data.client_names)
        for split in SPLITS
    }
    if config.data.aux_fraction > 0:  # held out of training, e.g. FedAMoLE's RSEA statistics
        train, aux = split_tail(train, config.data.aux_fraction)
        windows["aux"] = eval_windows(aux, seq, ev.max_windows, data.client_names)
    shared = {}
    for name, stream in (data.shared_eval or {}).items():
        w, v = eval_windows(stack_streams([stream]), seq, ev.max_windows)
        shared[f"shared_{name}"] = (w[0], v[0])
    problem = Problem.create(
        model,
        train,
        windows,
        training=config.training,
        optimizer=config.optimizer,
        strategy=config.strategy,
        eval_batch_size=ev.batch_size,
        client_names=data.client_names,
        shared_windows=shared,
        mixtures=data.mixtures,
        reference=data.reference,
    )
    return problem, data


@jax.jit
def _finite_per_client(params) -> jax.Array:
    """`bool [N]`: every adapter value of client i is finite."""
    per_leaf = [jnp.isfinite(x).reshape(x.shape[0], -1).all(1) for x in jax.tree.leaves(params)]
    return jnp.stack(per_leaf).all(0)


def _finite_or_raise(method: str, round_idx: int, metrics: dict, params, names) -> None:
    """Stops the run (before anything of this round is checkpointed) on a non-finite training
    loss or adapter value, naming the method, the clients and the round."""
    loss = np.asarray(metrics["train"]["train_loss"])
    finite = np.all(np.isfinite(loss), axis=-1) & np.asarray(_finite_per_client(params))
    bad = np.flatnonzero(~finite)
    if bad.size:
        who = [names[i] if names else int(i) for i in bad]
        raise FloatingPointError(
            f"method {method!r}: non-finite training loss or parameters for client(s) {who} in "
            f"round {round_idx}; lower the learning rate or check the data (the last good "
            "checkpoint, if any, is kept)"
        )


def _round_record(method: str, round_idx: int, metrics: dict, seconds: float) -> dict[str, Any]:
    record: dict[str, Any] = {"method": method, "round": round_idx, "seconds": seconds}
    if "train" in metrics:
        record["train_loss"] = np.asarray(metrics["train"]["train_loss"])[:, -1].tolist()
    if "aggregation" in metrics:
        agg = metrics["aggregation"]
        record["aggregated"] = bool(agg["applied"])
        if "matrix" in agg:
            record["trust"] = np.asarray(agg["matrix"], np.float64).tolist()
    for split, values in metrics.items():
        if split in ("train", "aggregation"):
            continue
        for key in ("ppl", "loss", "accuracy"):
            per_client = np.asarray(values[key], np.float64)
            record[f"{split}_{key}"] = per_client.tolist()
            record[f"{split}_mean_{key}"] = float(per_client.mean())
    return record


def method_factory(name: str, config: ExperimentConfig):
    """`problem -> Algorithm` for method `name`; factories with a `trust` option get
    `config.trust`."""
    factory = get_method(name)
    if "trust" in inspect.signature(factory).parameters:
        return functools.partial(factory, trust=config.trust)
    return factory


def run_method(
    name: str,
    problem: Problem,
    config: ExperimentConfig,
    log,
    *,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Runs one method for `config.rounds` rounds; returns and logs one record per round (round 0
    is the evaluation before training).

    With `config.checkpoint.every > 0` the whole state and the records are saved to
    `checkpoint_dir` every that many rounds and after the last; `resume` continues from the newest
    readable checkpoint there, so the final state and metrics equal an uninterrupted run's.
    """
    algo = method_factory(name, config)(problem)
    sim = algo.init(jax.random.key(config.seed))
    every = config.checkpoint.every
    ckpt = Checkpointer(checkpoint_dir, keep=config.checkpoint.keep) if every else None
    restored = ckpt.restore_latest(sim) if ckpt and resume else None
    if restored is None:
        first, records = 1, [_round_record(name, 0, algo.evaluate(sim), 0.0)]
    else:
        done, sim, records = restored
        first = done + 1
    for record in records:
        log(record)
    bar = tqdm(range(first, config.rounds + 1), desc=name, disable=not progress, leave=False)
    for r in bar:
        start = time.perf_counter()
        sim, metrics = algo.round(sim)
        metrics = jax.device_get(metrics)
        _finite_or_raise(name, r, metrics, sim.clients.params, problem.client_names)
        records.append(_round_record(name, r, metrics, time.perf_counter() - start))
        log(records[-1])
        if ckpt and (r % every == 0 or r == config.rounds):
            ckpt.save(r, sim, records)
        bar.set_postfix(val_ppl=f"{records[-1]['val_mean_ppl']:.3f}")
    if ckpt:
        ckpt.close()
    return records


def summarize(history: dict[str, list[dict[str, Any]]], client_names) -> dict[str, Any]:
    """Per method: final mean and per-client perplexity (test and validation splits)."""
    summary = {}
    for method, records in history.items():
        last = records[-1]
        summary[method] = {
            "rounds": last["round"],
            "client_names": list(client_names),
            **{
                f"{split}_{what}": last[f"{split}_{what}"]
                for split in SPLITS
                for what in ("mean_ppl", "ppl", "mean_accuracy")
            },
        }
    return summary


def plot_history(history: dict[str, list[dict[str, Any]]], path: Path, split: str = "val") -> None:
    """Per-client perplexity over rounds, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(history)
    fig, axes = plt.subplots(
        1, len(methods), figsize=(4 * len(methods), 3.2), squeeze=False, sharey=True
    )
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def plot_trust(matrices: dict[str, np.ndarray], client_names, path: Path, title: str = "") -> None:
    """Heatmaps of `N × N` mixing matrices side by side (row `i`: the weights client `i` uses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2), squeeze=False)
    for ax, (method, w) in zip(axes[0], matrices.items(), strict=True):
        im = ax.imshow(w, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(method)
        ticks = np.arange(w.shape[0])
        ax.set_xticks(ticks, list(client_names), rotation=90, fontsize=6)
        ax.set_yticks(ticks, list(client_names), fontsize=6)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def results_table(summary: dict[str, Any]) -> str:
    """A Markdown table of final mean perplexities and accuracy per method."""
    lines = [
        "| method | val ppl (mean) | test ppl (mean) | test accuracy |",
        "|---|---|---|---|",
    ]
    for method, s in summary.items():
        lines.append(
            f"| {method} | {s['val_mean_ppl']:.3f} | {s['test_mean_ppl']:.3f} | "
            f"{s['test_mean_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def train_and_evaluate(
    config: ExperimentConfig, out_dir: str | Path, *, progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Runs every method of `config` and writes under `out_dir`: `config.json`, `metrics.jsonl`
    (one record per method and round, with the mixing matrix), TensorBoard events in
    `tensorboard/` (and a W&B run if asked), `summary.json`, `results.md`, `ppl.png` and
    `trust.png` (final mixing matrices); returns the summary. Checkpoints go to
    `out_dir/checkpoints/<method>`; `resume` continues every method from its newest readable
    checkpoint."""
    out = Path(out_dir)
    checkpoints = out / "checkpoints"
    if not resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ValueError(
            f"{checkpoints} already holds checkpoints; pass --resume to continue that run or "
            "choose another output directory (nothing was overwritten)"
        )
    out.mkdir(parents=True, exist_ok=True)
    if config.tracking.wandb:
        require_wandb()
    problem, _ = build_problem(config)
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    trackers = open_trackers(
        out,
        tensorboard=config.tracking.tensorboard,
        wandb=config.tracking.wandb,
        project=config.tracking.wandb_project,
        config=to_dict(config),
    )
    history = {}
    try:
        for name in config.methods:
            history[name] = run_method(
                name,
                problem,
                config,
                trackers.log,
                progress=progress,
                checkpoint_dir=out / "checkpoints" / name,
                resume=resume,
            )
    finally:
        trackers.close()
    summary = summarize(history, problem.client_names)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(results_table(summary) + "\n")
    plot_history(history, out / "ppl.png")
    trust = final_trust(history, problem.num_clients)
    if trust:
        plot_trust(trust, problem.client_names, out / "trust.png")
    return summary
