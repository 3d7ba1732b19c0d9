"""Offline evidence for FedAMoLE: expert sharing within task groups, and FedAMoLE vs FedIT-FT.

Synthetic instruction data with known task groups (a Dolly-shaped jsonl under `OUT/data/`): every
category is a different deterministic task on random words (`TASKS`: repeat them, reverse them,
translate each through a fixed dictionary, name the first one). `data.source=dolly` with a small
Dirichlet `alpha` gives each client one dominant category, its group (`FederatedData.groups`).
The base is a tiny byte-level Llama pretrained here (`pretrain_base`, into `OUT/base/`) on other
tasks over the same words and prompt template (`PRETRAIN_TASKS`). `run.py`'s `run_table` trains
the methods; then, from the last round's expert assignment of every FedAMoLE run (`X[e, c]` =
client `c` holds expert `e`, per AMoLE module), `sharing_summary` compares the experts shared by
same-group and different-group client pairs (`pair_sharing`) with the chance level of random
assignments under the same constraints (`chance_sharing`). `OUT/evidence.md` and
`OUT/evidence.json` hold the sharing table, the task scores (ROUGE-L × 100) and the test /
validation perplexities of the last round.

    python experiments/fedamole/evidence.py --out runs/fedamole_evidence
    python experiments/fedamole/evidence.py --quick --out /tmp/fedamole_evidence   # tests
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from run import cell_config, run_table  # noqa: E402

from fedjax_lora.aggregation.rsea import random_assignment  # noqa: E402
from fedjax_lora.data.datasets_hf import alpaca_prompt  # noqa: E402
from fedjax_lora.data.instruction import ByteTokenizer  # noqa: E402
from fedjax_lora.engine.loss import token_cross_entropy  # noqa: E402
from fedjax_lora.engine.optim import standard_promotion  # noqa: E402
from fedjax_lora.experiment import base_tokenizer, build_data  # noqa: E402
from fedjax_lora.export import save_merged  # noqa: E402
from fedjax_lora.models import ModelConfig, from_config  # noqa: E402
from fedjax_lora.report import load_history  # noqa: E402

# fmt: off
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "rain", "tree",
         "bird", "fish", "moon", "star", "lake", "hill", "rock", "wind"]
# fmt: on
_DICTIONARY = dict(zip(WORDS, WORDS[5:] + WORDS[:5], strict=True))

Task = tuple[str, Callable[[list[str]], str]]

TASKS: dict[str, Task] = {
    "copy": ("Repeat the words", lambda w: " ".join(w)),
    "reverse": ("Reverse the words", lambda w: " ".join(reversed(w))),
    "translate": ("Translate the words", lambda w: " ".join(_DICTIONARY[x] for x in w)),
    "first": ("Name the first word", lambda w: f"the first word is {w[0]}"),
}
"""Category -> (instruction, response of the words): the clients' task groups."""

PRETRAIN_TASKS: dict[str, Task] = {
    "last": ("Write the last word", lambda w: w[-1]),
    "middle": ("Write the middle word", lambda w: w[1]),
    "twice": ("Write each word twice", lambda w: " ".join(x for x in w for _ in range(2))),
    "drop": ("Drop the first word", lambda w: " ".join(w[1:])),
}
"""Other tasks on the same words and template, the base's pretraining (none of `TASKS`)."""

MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256, "max_positions": 128}
QUICK_MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_positions": 64}
"""The base sizes (`ModelConfig`; byte vocabulary, Llama family): the evidence, `--quick`."""

SHARING_METHODS = ("fedamole", "fedamole-r")


def task_rows(tasks: dict[str, Task], per_task: int, words: int, seed: int) -> list[dict[str, str]]:
    """`per_task` Dolly-shaped rows of every task, on `words` random words each (the words in the
    instruction, an empty context), interleaved by task."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(per_task):
        for category, (instruction, respond) in tasks.items():
            w = [str(x) for x in rng.choice(WORDS, words, replace=False)]
            rows.append(
                {
                    "instruction": f"{instruction}: {' '.join(w)}",
                    "context": "",
                    "response": respond(w),
                    "category": category,
                }
            )
    return rows


def write_jsonl(rows: list[dict[str, str]], path: Path) -> Path:
    """Writes the rows one JSON object a line; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pretrain_base(
    out: Path, model: dict[str, int], *, steps: int, batch_size: int, seq_len: int, seed: int = 0
) -> Path:
    """Trains every weight of a random byte-level Llama (`model`: `ModelConfig` sizes) on
    `PRETRAIN_TASKS` rows (prompt, response and EOS; loss on every byte) and saves it to `out`
    (`model.source=out`): a base that knows the words and the template but none of `TASKS`."""
    rows = task_rows(PRETRAIN_TASKS, 2000, words=3, seed=seed + 1)
    eos = chr(ByteTokenizer.eos_token_id)
    text = "".join(
        alpaca_prompt(r["instruction"], r["context"]) + r["response"] + eos for r in rows
    )
    stream = jnp.asarray(np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32))
    net = from_config(ModelConfig(family="llama", vocab_size=256, **model), seed=seed)
    graphdef, params = nnx.split(net, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 20 + 1, steps)
    tx = standard_promotion(optax.adamw(schedule))

    def loss_fn(p, batch):
        logits = nnx.merge(graphdef, p)(batch[:, :-1])
        return token_cross_entropy(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(p, opt, key):
        starts = jax.random.randint(key, (batch_size, 1), 0, stream.size - seq_len - 1)
        loss, grads = jax.value_and_grad(loss_fn)(p, stream[starts + jnp.arange(seq_len + 1)])
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt, key = tx.init(params), jax.random.key(seed)
    for i in range(steps):
        params, opt, loss = step(params, opt, jax.random.fold_in(key, i))
    print(f"pretrained the base: {steps} steps, last loss {float(loss):.3f}")
    nnx.update(net, params)
    return save_merged(net, out)


def evidence_grid(data_path: Path, base_path: Path, quick: bool = False) -> dict[str, Any]:
    """A one-cell `run_table` grid (`tasks`) on the jsonl at `data_path` with the byte-level base
    at `base_path`, LoRA (FedIT-FT) and AMoLE (FedAMoLE) on q and v; `quick`: a one-round check."""
    experts = {"clients_per_expert": 2, "min_experts": 2, "max_experts": 4}
    amole = {"targets": ["q_proj", "v_proj"], "num_experts": 12, "rank": 8, "alpha": 16.0}
    base = {
        "rounds": 20,
        "model": {"source": str(base_path)},
        "lora": {"targets": ["q_proj", "v_proj"], "rank": 8, "alpha": 16.0, "dropout": 0.05},
        "training": {"steps": 20, "batch_size": 8, "seq_len": 96, "sampling": "random"},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "eval": {
            "max_windows": 16,
            "batch_size": 8,
            "generation": {
                "metric": "rouge_l",
                "max_new_tokens": 24,
                "max_examples": 16,
                "max_prompt_tokens": 64,
            },
        },
        "data": {
            "source": "dolly",
            "paths": [str(data_path)],
            "num_clients": 8,
            "alpha": 0.1,
            "seed": 4,  # a Dirichlet(0.1) draw with two clients per task group (see the docs)
            "val_fraction": 0.1,
            "test_fraction": 0.1,
            # The byte-level Alpaca prompts are longer than the quick check's windows.
            "instruction_packing": "windows",
        },
        "method_options": {m: {"amole": amole, **experts} for m in ("fedamole", "fedamole-r")},
        "tracking": {"tensorboard": False, "progress": False},
    }
    if quick:
        base["rounds"] = 1
        base["training"].update(steps=2, batch_size=2, seq_len=32)
        base["eval"].update(max_windows=2, batch_size=4)
        base["eval"]["generation"].update(max_new_tokens=4, max_examples=2, max_prompt_tokens=24)
        base["data"].update(num_clients=4, seed=2)
        amole.update(num_experts=4, rank=2)
    return {
        "seeds": [0],
        "methods": ["fedamole", "fedit-ft"] if quick else ["fedamole", "fedamole-r", "fedit-ft"],
        "aux_methods": ["fedamole", "fedamole-r"],
        "aux_fraction": 0.2,
        "ours": "fedamole",
        "compare": ["fedit-ft"],
        "base": base,
        "scenarios": [{"name": "tasks", "set": {}}],
    }


def pair_sharing(X: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """`(same, different)`: the mean number of experts both clients hold (`X[:, i] · X[:, j]`) over
    client pairs `i < j` of the same group and of different groups (NaN without such pairs).

    X: 0/1 `[E, C]` (`X[e, c]` = client `c` holds expert `e`); groups: `int [C]`."""
    x = np.asarray(X, np.int64)
    overlap = x.T @ x
    i, j = np.triu_indices(x.shape[1], k=1)
    same = np.asarray(groups)[i] == np.asarray(groups)[j]
    mean = lambda sel: float(overlap[i[sel], j[sel]].mean()) if sel.any() else float("nan")
    return mean(same), mean(~same)


def chance_sharing(
    num_experts: int, groups: np.ndarray, options: dict[str, int], draws: int, seed: int = 0
) -> np.ndarray:
    """`[draws, 2]` `pair_sharing` of random assignments with the same constraints
    (`rsea.random_assignment`, `options` = FedAMoLE's `clients_per_expert`, `min_experts`,
    `max_experts`): the sharing statistics' distribution under chance."""
    rng = np.random.default_rng(seed)
    k, lo, hi = (options[n] for n in ("clients_per_expert", "min_experts", "max_experts"))
    return np.array(
        [
            pair_sharing(random_assignment(rng, num_experts, len(groups), k, lo, hi), groups)
            for _ in range(draws)
        ]
    )


def sharing_summary(
    experts: dict[str, list[list[int]]], groups: np.ndarray, options: dict[str, int], draws: int
) -> dict[str, Any]:
    """Per AMoLE module and on average over modules: same- and different-group sharing, the
    chance level (mean of `draws` random assignments per module) and the one-sided Monte Carlo
    p-value of the module-averaged `same - different` gap under chance."""
    modules = {m: pair_sharing(np.asarray(x), groups) for m, x in experts.items()}
    null = np.stack(
        [
            chance_sharing(len(x), groups, options, draws, seed=s)
            for s, x in enumerate(experts.values())
        ]
    )  # [modules, draws, 2]
    observed = np.mean(list(modules.values()), axis=0)
    gaps = (null[..., 0] - null[..., 1]).mean(0)
    exceed = np.sum(gaps >= observed[0] - observed[1]) if np.isfinite(observed[0]) else np.nan
    return {
        "modules": {m: {"same": s, "different": d} for m, (s, d) in modules.items()},
        "same": float(observed[0]),
        "different": float(observed[1]),
        "chance_same": float(null[..., 0].mean()),
        "chance_different": float(null[..., 1].mean()),
        "p_value": float((1 + exceed) / (1 + draws)),
    }


def last_scores(records: list[dict[str, Any]]) -> dict[str, float]:
    """The clients' mean ROUGE-L × 100 of the base (round 0) and of the last round, and the last
    round's mean test and validation perplexities."""
    first, last = records[0], records[-1]
    return {
        "rouge_l_base": 100.0 * first["task_mean_rouge_l"],
        "rouge_l": 100.0 * last["task_mean_rouge_l"],
        "test_ppl": last["test_mean_ppl"],
        "val_ppl": last["val_mean_ppl"],
    }


def evidence(
    out: Path,
    *,
    quick: bool = False,
    base: Path | None = None,
    pretrain_steps: int = 1500,
    seeds: list[int] = (0,),
    draws: int = 500,
    overrides: list[str] = (),
) -> dict[str, Any]:
    """Writes the data, pretrains the base into `OUT/base` (unless `base` is given), runs the
    grid's methods for every seed (`run_table`) and returns the evidence: the clients' groups, per
    seed `sharing_summary` per FedAMoLE method and `last_scores` per method, and `pooled`: the
    `sharing_summary` of all seeds' modules together."""
    per_task = 20 if quick else 200
    data = write_jsonl(task_rows(TASKS, per_task, words=3, seed=0), out / "data" / "tasks.jsonl")
    if base is None:
        model, seq = (QUICK_MODEL, 32) if quick else (MODEL, 128)
        base = pretrain_base(out / "base", model, steps=pretrain_steps, batch_size=32, seq_len=seq)
    grid = evidence_grid(data, base, quick)
    run_table(grid, out, seeds=list(seeds), overrides=list(overrides), progress=False)
    cell = grid["scenarios"][0]
    config = cell_config(grid, cell, seeds[0], grid["methods"], list(overrides), aux=True)
    groups = build_data(config, config.model.vocab_size, base_tokenizer(config)).groups
    histories = {}
    for seed in seeds:
        run_dir = out / cell["name"] / f"seed{seed}"
        histories[seed] = {**load_history(run_dir / "aux"), **load_history(run_dir / "plain")}
    options = {m: config.method_options[m] for m in SHARING_METHODS if m in config.methods}
    final = {m: {s: h[m][-1]["experts"] for s, h in histories.items()} for m in options}
    runs = {
        seed: {
            "sharing": {
                m: sharing_summary(final[m][seed], groups, o, draws) for m, o in options.items()
            },
            "scores": {m: last_scores(records) for m, records in history.items()},
        }
        for seed, history in histories.items()
    }
    pooled = {
        m: sharing_summary(
            {f"seed{s}/{module}": x for s, held in final[m].items() for module, x in held.items()},
            groups,
            o,
            draws,
        )
        for m, o in options.items()
    }
    return {"categories": sorted(TASKS), "groups": groups.tolist(), "runs": runs, "pooled": pooled}


def seed_rows(runs: dict[int, dict[str, Any]], section: str) -> list[tuple[str, str, dict]]:
    """`(method, seed, values)` of a section (e.g. `scores`) for every method and seed, and the
    mean of the numbers over seeds (seed `mean`) when there are several."""
    rows = []
    for method in next(iter(runs.values()))[section]:
        values = [run[section][method] for run in runs.values()]
        rows += [(method, str(seed), run[section][method]) for seed, run in runs.items()]
        if len(values) > 1:
            keys = [k for k, v in values[0].items() if isinstance(v, float)]
            rows.append((method, "mean", {k: float(np.mean([v[k] for v in values])) for k in keys}))
    return rows


def evidence_markdown(result: dict[str, Any]) -> str:
    """The sharing table (module means; per seed and pooled over the seeds' modules) and the
    score table (per seed and the mean)."""
    lines = [
        f"Client groups (majority category of {result['categories']}): {result['groups']}",
        "",
        "| method | seed | same-group pairs | different-group pairs | chance (same / different) "
        "| p (same - different) |",
        "|---|---|---|---|---|---|",
    ]
    runs = result["runs"]
    for m, pooled in result["pooled"].items():
        rows = [(str(seed), run["sharing"][m]) for seed, run in runs.items()]
        for seed, s in rows + ([("pooled", pooled)] if len(runs) > 1 else []):
            lines.append(
                f"| {m} | {seed} | {s['same']:.3f} | {s['different']:.3f} | "
                f"{s['chance_same']:.3f} / {s['chance_different']:.3f} | {s['p_value']:.4f} |"
            )
    lines += [
        "",
        "| method | seed | ROUGE-L × 100 (base → last round) | test ppl | val ppl |",
        "|---|---|---|---|---|",
    ]
    for m, seed, s in seed_rows(result["runs"], "scores"):
        lines.append(
            f"| {m} | {seed} | {s['rouge_l_base']:.2f} → {s['rouge_l']:.2f} | "
            f"{s['test_ppl']:.3f} | {s['val_ppl']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/fedamole_evidence")
    parser.add_argument("--quick", action="store_true", help="tiny one-round check (tests)")
    parser.add_argument("--base", help="an already pretrained base (default: pretrain one)")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--draws", type=int, default=500, help="random assignments per module")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    out = Path(args.out)
    result = evidence(
        out,
        quick=args.quick,
        base=Path(args.base) if args.base else None,
        pretrain_steps=5 if args.quick else args.pretrain_steps,
        seeds=args.seeds,
        draws=args.draws,
        overrides=args.set,
    )
    (out / "evidence.json").write_text(json.dumps(result, indent=2))
    (out / "evidence.md").write_text(evidence_markdown(result) + "\n")
    print((out / "evidence.md").read_text())
    print(f"wrote {out / 'evidence.md'} and {out / 'evidence.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
