"""Task 2: trajectory parity of the reference's training loop and fedjax_lora's rounds.

Both sides start from the same tiny GPT-2 base (written once as a Hugging Face safetensors dir,
loaded by `fedjax_lora.models.load` and, the way the reference's `from_pretrained` does, into its
`GPTLoRA`), the same per-client LoRA init (fedjax_lora's draw copied into the reference models),
and train on the same batches: the window starts that fedjax_lora's engine draws are replayed on
the host (`common.jax_train_starts`) and injected into the reference's `get_batch`; validation and
reference windows are fixed and shared. Dropout is 0 on both sides (no shared RNG).

The reference runs its own `train_lora` (per-client AdamW + OneCycleLR as in its `main.py`, its
aggregation schedule `itr % trust_freq == 0 and itr >= pretraining_rounds - 1`, its evaluation
every `eval_freq` steps); fedjax_lora runs `trust_weighted(problem, rule)` round by round.

Compared: per-step training loss, per-round validation perplexity, every trust matrix, the
adapters after every aggregation, the final adapters.

On the HEAD layout `aggregate()` routes `dynamic-ref`/`dynamic-token` to the weight-similarity
branch without softmax (a reference bug, see parity_rules.py); there the harness replaces
`optim.lora.aggregate` by a dispatcher that calls the same `optim.strategies` helpers the way the
paper-era code did (`--head-dispatch as-is` keeps the bug). The paper-era layout needs no patch.

    REF_DIR=<exported reference> python trajectory.py --rules validation fedavg [--out-dir OUT_DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Feeder,
    TinyGPT2,
    copy_adapters_to_ref,
    jax_adapters,
    jax_model_from_hf,
    jax_train_starts,
    markov_streams,
    max_abs_diff,
    ref_adapters,
    ref_clients,
    ref_model_from_hf,
    stream_provider,
    window_provider,
    write_tiny_gpt2,
)
from refimport import load_reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import Results  # noqa: E402

REF_TRUST = {
    "validation": "dynamic-ref",
    "fedavg": "naive",
    "weights": "dynamic",
    "prediction": "dynamic-token",
}


def fixed_head_aggregate(REF):
    """HEAD's `aggregate` with the paper-era dispatch order (ref/token before 'dynamic'), built
    from HEAD's own helpers; only the plain variants are needed here."""
    S = REF.strategies
    F = REF.torch.nn.functional

    def aggregate(clients, trust, data, sequence_length, batch_size, type_ctx, extra_args):
        if trust == "none":
            return
        if trust == "naive":
            w = S.__dict__["__naive_weights"](clients)
        elif trust == "dynamic":
            w = F.softmax(S.__dict__["__trust_weights_weights"](clients, S.similarity_weights), 1)
        elif trust == "dynamic-ref":
            w = F.softmax(
                S.__dict__["__trust_weights_ref"](
                    clients, data, sequence_length, batch_size, type_ctx, extra_args
                ),
                dim=1,
            )
        elif trust == "dynamic-token":
            w = F.softmax(
                S.__dict__["__trust_weights_token"](
                    clients, data, sequence_length, batch_size, type_ctx, extra_args
                ),
                dim=1,
            )
        else:
            raise ValueError(trust)
        S.__dict__["__weighted_average"](clients, w, extra_args)

    return aggregate


def run_pair(REF, rule, a, hf_dir, streams, val_windows, ref_windows, log):
    import jax

    from fedjax_lora.algorithms import Problem
    from fedjax_lora.algorithms.trust_weighted import TrustOptions, trust_weighted
    from fedjax_lora.data.streams import stack_streams
    from fedjax_lora.engine import LocalTraining, OptimizerConfig, Strategy

    N, R, Fs, R0 = a.clients, a.rounds, a.steps, a.first_aggregation_round
    B, T, acc = a.batch_size, a.seq_len, a.grad_accum
    total = R * Fs
    n_train = len(streams[0]) - a.val_tokens
    train = [np.asarray(s[:n_train], np.int32) for s in streams]

    # ------------------------------------------------------------------ fedjax_lora
    opt_cfg = OptimizerConfig(
        name="adamw",
        lr=a.lr,
        schedule="one_cycle",
        total_steps=total,
        pct_start=a.pct_start,
        div_factor=100.0,
        final_div_factor=0.05,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=1e-3,
    )
    problem = Problem.create(
        jax_model_from_hf(hf_dir, rank=a.rank, alpha=a.alpha),
        stack_streams(train),
        {"val": (val_windows, np.ones(val_windows.shape[:2], bool))},
        training=LocalTraining(
            steps=Fs, batch_size=B, seq_len=T, grad_accum=acc, sampling="random", dropout=False
        ),
        optimizer=opt_cfg,
        strategy=Strategy(a.strategy),
        eval_batch_size=B,
        reference=ref_windows[:, :T],
    )
    key = jax.random.key(a.seed)

    def run_jax(strategy):
        import dataclasses

        prob = dataclasses.replace(problem, strategy=Strategy(strategy))
        alg = trust_weighted(prob, rule, TrustOptions(first_aggregation_round=R0))
        state = alg.init(key)
        init = jax_adapters(state.clients.params)
        hist = []
        t0 = time.perf_counter()
        for _ in range(R):
            state, m = alg.round(state)
            m = jax.device_get(m)
            hist.append(
                {
                    "train_loss": np.asarray(m["train"]["train_loss"], np.float64),  # [N, F]
                    "val_ppl": np.asarray(m["val"]["ppl"], np.float64),
                    "applied": bool(m["aggregation"]["applied"]),
                    "matrix": np.asarray(m["aggregation"]["matrix"], np.float64),
                    "adapters": jax_adapters(state.clients.params),
                }
            )
        return init, hist, state, time.perf_counter() - t0

    init, jax_hist, state, t_jax = run_jax(a.strategy)
    control = None
    if a.control_strategy:
        c_init, c_hist, c_state, _ = run_jax(a.control_strategy)
        assert max_abs_diff(c_init, init) == 0.0
        control = c_hist

    # ------------------------------------------------------------------ reference
    models = [
        ref_model_from_hf(REF, hf_dir, lora_rank=a.rank, lora_alpha=a.alpha) for _ in range(N)
    ]
    copy_adapters_to_ref(init, models)
    clients = ref_clients(REF, models, lr=a.lr, iterations=total, pct_start=a.pct_start)
    starts = jax_train_starts(
        key, [len(s) for s in train], steps_total=total, grad_accum=acc, batch_size=B, seq_len=T
    )
    feeder = Feeder(REF)
    data = {"train": [], "val": [], "ref": None}
    for i in range(N):
        arr = np.asarray(train[i], np.int64)
        data["train"].append(feeder.register(arr, stream_provider(arr, starts[i], T)))
        val_arr = np.zeros(8, np.int64)  # identity only: windows come from the provider
        data["val"].append(feeder.register(val_arr, window_provider(val_windows[i], B)))
    ref_arr = np.zeros(8, np.int64)
    padded = np.concatenate([ref_windows[:, :T], np.zeros((len(ref_windows), 1), np.int32)], 1)
    data["ref"] = feeder.register(ref_arr, window_provider(padded, B))

    losses = [[] for _ in range(N)]
    lrs = [[] for _ in range(N)]
    for i, (model, opt, _) in enumerate(clients):
        model.register_forward_hook(
            lambda mod, inp, out, i=i: (
                losses[i].append(float(out["loss"]))
                if mod.training and out.get("loss") is not None
                else None
            )
        )
        opt.register_step_pre_hook(lambda o, args, kw, i=i: lrs[i].append(o.param_groups[0]["lr"]))

    wmod = REF.strategies if REF.layout == "head" else REF.lora
    orig_wa = wmod.__dict__["__weighted_average"]
    ref_aggs = []

    def capture(clients_, trust_weights, *rest):
        out = orig_wa(clients_, trust_weights, *rest)
        ref_aggs.append(
            {
                "matrix": np.array(trust_weights, np.float64),
                "adapters": ref_adapters([c[0] for c in clients_]),
            }
        )
        return out

    wmod.__dict__["__weighted_average"] = capture
    patched = None
    if REF.layout == "head" and a.head_dispatch == "fixed":
        patched = REF.lora.aggregate
        REF.lora.aggregate = fixed_head_aggregate(REF)
    from distributed.single import SingleNodeBackend

    extra = Namespace(
        device="cpu",
        no_compile=True,
        grad_clip=0.0,
        trust=REF_TRUST[rule],
        trust_freq=Fs,
        pretraining_rounds=R0 * Fs,
        wandb=False,
        dataset=None,
        k=3,
        lr=a.lr,
    )
    cwd = os.getcwd()
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)  # HEAD's train_lora torch.save()s every client at each eval
            with contextlib.redirect_stdout(io.StringIO()):
                stats = REF.lora.train_lora(
                    clients,
                    data,
                    total,
                    acc,
                    B,
                    T,
                    a.eval_freq or Fs,
                    SingleNodeBackend(None),
                    extra,
                )
    finally:
        os.chdir(cwd)
        wmod.__dict__["__weighted_average"] = orig_wa
        if patched is not None:
            REF.lora.aggregate = patched
        feeder.restore()
    t_ref = time.perf_counter() - t0

    # ------------------------------------------------------------------ compare
    ref_loss = np.array([np.array(x).reshape(total, acc).mean(1) for x in losses])  # [N, total]
    jax_loss = np.concatenate([h["train_loss"] for h in jax_hist], axis=1)
    ref_ppl = np.array(stats["val_pp"], np.float64).T  # [evals, N]
    if len(ref_ppl) != R:  # evaluated less often than every round: compare the last one only
        ref_ppl = (
            np.concatenate([np.full((R - len(ref_ppl), N), np.nan), ref_ppl[-1:]], 0)
            if len(ref_ppl) == 1
            else ref_ppl
        )
    jax_ppl = np.array([h["val_ppl"] for h in jax_hist])
    sched = opt_cfg.learning_rate()
    lr_rel = np.max(
        np.abs(np.array([float(sched(t)) for t in range(total)]) - np.array(lrs[0]))
        / np.array(lrs[0])
    )
    applied = [r for r, h in enumerate(jax_hist) if h["applied"]]
    out = {
        "rule": rule,
        "ref_trust": REF_TRUST[rule],
        "layout": REF.layout,
        "ref_eval_freq": a.eval_freq or Fs,
        "ref_no_merge": a.ref_no_merge,
        "lr": a.lr,
        "seconds": {"jax": t_jax, "ref": t_ref},
        "lr_rel_diff": float(lr_rel),
        "aggregations": {"jax": len(applied), "ref": len(ref_aggs)},
        "rounds": [],
    }
    log(
        f"\n=== rule {rule} (ref `{REF_TRUST[rule]}`, {REF.layout} layout): {N} clients, "
        f"{R} rounds x {Fs} steps, batch {B}x{acc}, seq {T}, lr {a.lr}; "
        f"ref eval_freq {a.eval_freq or Fs}"
        f"{', ref LoRA merge at eval() disabled' if a.ref_no_merge else ''}; aggregations jax "
        f"{len(applied)} / ref {len(ref_aggs)}; LR max rel diff {lr_rel:.1e}"
    )
    step_d = np.abs(ref_loss - jax_loss).max(0)
    out["step_loss_max_abs"] = step_d.tolist()
    log("per-step training loss max|d| over clients: " + " ".join(f"{d:.0e}" for d in step_d))
    if control is not None:
        c_loss = np.concatenate([h["train_loss"] for h in control], axis=1)
        c_step = np.abs(c_loss - jax_loss).max(0)
        out["control"] = {
            "strategy": a.control_strategy,
            "step_loss_max_abs": c_step.tolist(),
            "final_adapters_max_abs": max_abs_diff(
                control[-1]["adapters"], jax_hist[-1]["adapters"]
            ),
        }
        log(
            f"control: fedjax_lora {a.strategy} vs {a.control_strategy} (same code, different "
            f"float op order), per-step loss max|d|: "
            + " ".join(f"{d:.0e}" for d in c_step)
            + f"; final adapters max|d| {out['control']['final_adapters_max_abs']:.2e}"
        )
    log(
        "round | step loss: max|d| (max rel) | val ppl: max rel d | W: max|d| | adapters after "
        "round: max|d| | W row 0 (jax)"
    )
    k = 0
    for r, h in enumerate(jax_hist):
        sl = slice(r * Fs, (r + 1) * Fs)
        dl = np.abs(ref_loss[:, sl] - jax_loss[:, sl])
        dp = np.max(np.abs(ref_ppl[r] - jax_ppl[r]) / jax_ppl[r])
        row = {
            "round": r + 1,
            "loss_max_abs": float(dl.max()),
            "loss_max_rel": float((dl / jax_loss[:, sl]).max()),
            "ppl_max_rel": float(dp),
        }
        wtxt, atxt, w0 = "-", "-", ""
        if h["applied"]:
            ra = ref_aggs[k]
            k += 1
            row["W_max_abs"] = float(np.abs(ra["matrix"] - h["matrix"]).max())
            row["adapters_max_abs"] = max_abs_diff(ra["adapters"], h["adapters"])
            wtxt, atxt = f"{row['W_max_abs']:.2e}", f"{row['adapters_max_abs']:.2e}"
            w0 = np.array2string(h["matrix"][0], precision=3, suppress_small=True)
        out["rounds"].append(row)
        log(
            f"{r + 1:5d} | {row['loss_max_abs']:.2e} ({row['loss_max_rel']:.1e}) | "
            f"{dp:.2e} | {wtxt} | {atxt} | {w0}"
        )
    final = max_abs_diff(ref_adapters(models), jax_adapters(state.clients.params))
    scale = max(float(np.abs(v).max()) for v in jax_adapters(state.clients.params).values())
    out["final_adapters_max_abs"] = final
    out["final_adapters_scale"] = scale
    out["first_step_loss_max_abs"] = float(np.abs(ref_loss[:, 0] - jax_loss[:, 0]).max())
    log(
        f"final adapters max|d| {final:.2e} (max |value| {scale:.2f}); first-step loss max|d| "
        f"{out['first_step_loss_max_abs']:.2e}; val ppl round {R}: ref "
        f"{np.round(ref_ppl[-1], 3).tolist()} jax {np.round(jax_ppl[-1], 3).tolist()}; "
        f"wall s: ref {t_ref:.1f}, jax {t_jax:.1f} (incl. compile)"
    )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-dir", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out-dir", default=None, help="results go to OUT_DIR/parts/ ($OUT_DIR)")
    ap.add_argument(
        "--rules", nargs="+", default=["validation", "fedavg"], choices=sorted(REF_TRUST)
    )
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="local steps per round (trust_freq)")
    ap.add_argument(
        "--first-aggregation-round",
        type=int,
        default=2,
        help="fedjax_lora R0; the reference gets pretraining_rounds = R0 * steps",
    )
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pct-start", type=float, default=0.2)
    ap.add_argument("--tokens", type=int, default=3000, help="tokens per client stream")
    ap.add_argument("--val-tokens", type=int, default=600)
    ap.add_argument("--strategy", default="map", choices=["map", "vmap"])
    ap.add_argument("--head-dispatch", default="fixed", choices=["fixed", "as-is"])
    ap.add_argument(
        "--control-strategy",
        default=None,
        choices=["map", "vmap"],
        help="also run fedjax_lora with this strategy: the size of pure float-order "
        "divergence, to judge the reference-vs-JAX gap against",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--eval-freq",
        type=int,
        default=None,
        help="the reference's eval_freq (default: --steps, i.e. after every round)",
    )
    ap.add_argument(
        "--ref-no-merge",
        action="store_true",
        help="diagnostic: stop the reference's LoRALinear.eval() from merging B·A into "
        "the frozen weight in place (train() subtracts it again, not exactly)",
    )
    a = ap.parse_args(argv)

    REF = load_reference(a.ref_dir)
    import jax

    if a.ref_no_merge:
        REF.models.LoRALinear.train = lambda self, mode=True: REF.torch.nn.Linear.train(self, mode)

    print(
        f"reference layout {REF.layout} ({REF.root.name}); torch {REF.torch.__version__}, "
        f"jax {jax.__version__}",
        flush=True,
    )
    work = Path(a.work or tempfile.mkdtemp(prefix="trustparity_"))
    cfg = TinyGPT2(vocab=256, d=64, layers=2, heads=4, positions=a.seq_len, seed=a.seed)
    hf_dir = write_tiny_gpt2(work / f"tiny_gpt2_T{a.seq_len}", cfg)
    rng = np.random.default_rng(a.seed + 1)
    streams = markov_streams(a.clients, a.groups, a.tokens, cfg.vocab, a.seed)
    W = 12 * a.batch_size  # the reference's eval: 12 batches of batch_size windows
    val_windows = np.stack(
        [
            np.stack(
                [
                    s[o : o + a.seq_len + 1]
                    for o in (len(s) - a.val_tokens)
                    + rng.integers(0, a.val_tokens - a.seq_len - 1, W)
                ]
            )
            for s in streams
        ]
    ).astype(np.int32)
    pool = markov_streams(a.groups, a.groups, 1000, cfg.vocab, a.seed)  # same chains, fresh text
    S = 4 * a.batch_size  # the reference's 4 reference batches
    ref_windows = np.stack(
        [
            pool[j % a.groups][o : o + a.seq_len + 1]
            for j, o in enumerate(rng.integers(0, 1000 - a.seq_len - 1, S))
        ]
    ).astype(np.int32)

    results = []
    for rule in a.rules:
        results.append(
            run_pair(
                REF,
                rule,
                a,
                hf_dir,
                streams,
                val_windows,
                ref_windows,
                lambda s: print(s, flush=True),
            )
        )
    R = Results(f"trajectory_{REF.layout}")
    for out in results:
        checks(R, out)
    print(f"written {R.save(a.out_dir)}")


def checks(R: Results, out: dict) -> None:
    """Tolerances: float32 rounding at the paper's learning rate (README: per-step loss <= 4.3e-6,
    val ppl rel. <= 5.6e-6, W <= 6.3e-5, final adapters <= 2.9e-5 on the first run)."""
    tag = f"{out['rule']} (ref {out['ref_trust']}, lr {out['lr']:g})"
    rounds = out["rounds"]
    R.check(f"{tag}: per-step training loss", max(out["step_loss_max_abs"]), 2e-5)
    R.check(f"{tag}: validation perplexity (rel.)", max(r["ppl_max_rel"] for r in rounds), 2e-5)
    n_jax, n_ref = out["aggregations"]["jax"], out["aggregations"]["ref"]
    R.check(f"{tag}: number of aggregations ({n_jax} jax / {n_ref} ref)", abs(n_jax - n_ref), 0)
    if any("W_max_abs" in r for r in rounds):
        R.check(f"{tag}: trust matrix W", max(r.get("W_max_abs", 0.0) for r in rounds), 2e-4)
        R.check(
            f"{tag}: adapters after each aggregation",
            max(r.get("adapters_max_abs", 0.0) for r in rounds),
            2e-4,
        )
    R.check(f"{tag}: final adapters", out["final_adapters_max_abs"], 2e-4)
    R.check(f"{tag}: learning-rate schedule (rel.)", out["lr_rel_diff"], 2e-5)
    R.speed[f"{out['rule']}_seconds_incl_compile"] = out["seconds"]


if __name__ == "__main__":
    main()
