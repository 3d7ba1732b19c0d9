"""Task 3: speed and memory, the reference's training loop vs fedjax_lora's round.

One round = `--steps` local steps of every client (batch `--batch-size` x `--seq-len`, one
micro-batch), FedAvg (`naive` / `pcl-fedavg`), then every client's evaluation on 12 batches of
`--batch-size` windows (what the reference's `eval` does at the end of `train_lora`).

- `ref`: the reference's real code path, `optim.lora.train_lora` on N `GPTLoRA` copies (one
  model + AdamW + OneCycleLR per client, Python loop over clients, its own `get_batch`, eager
  unless `--ref-compile`), dropout 0.2 / attention dropout 0.2 / LoRA dropout 0.1 as in the paper;
  HEAD's loop also `torch.save`s every client at the evaluation step (into a temp dir; timed).
- `jax-map`, `jax-vmap`: `trust_weighted(problem, "fedavg")` with `Strategy("map")` /
  `Strategy("vmap")`, the same model, dropout and evaluation windows; the round is one compiled
  program (compile excluded by the warm-up).

Each arm runs in its own long-lived worker process (so peak RSS is per arm); the driver warms
every arm up once, then interleaves `--reps` repetitions A B C A B C ... Reported: seconds per
round, client-steps per second (N * steps / round time), the phase split (evaluation and, for the
reference, checkpoint saving, timed separately), peak RSS.

    REF_DIR=<exported reference> python speed.py [--reps 3] [--out-dir OUT_DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402
    LORA_TARGETS,
    TinyGPT2,
    current_rss_mib,
    peak_rss_mib,
    ref_clients,
    ref_model_from_hf,
    write_tiny_gpt2,
)
from results import Results  # noqa: E402


def add_config_args(ap):
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=40000, help="training tokens per client")
    ap.add_argument("--ref-compile", action="store_true", help="torch.compile the reference models")
    ap.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------------------------
# Workers


def setup_ref(a, hf_dir):
    from refimport import load_reference

    REF = load_reference(a.ref_dir)
    torch = REF.torch
    rng = np.random.default_rng(a.seed)
    models = [
        ref_model_from_hf(
            REF, hf_dir, lora_rank=a.rank, lora_alpha=a.alpha, lora_dropout=0.1, dropout=0.2
        )
        for _ in range(a.clients)
    ]
    clients = ref_clients(REF, models, lr=2e-3, iterations=a.steps * 1000, pct_start=0.02)
    if a.ref_compile:
        for c in clients:
            c[0] = torch.compile(c[0], dynamic=True)
    data = {
        "train": [rng.integers(0, a.vocab, a.tokens).astype(np.uint16) for _ in range(a.clients)],
        "val": [
            rng.integers(0, a.vocab, 20 * a.batch_size * (a.seq_len + 1)).astype(np.uint16)
            for _ in range(a.clients)
        ],
    }
    from distributed.single import SingleNodeBackend

    extra = Namespace(
        device="cpu",
        no_compile=True,
        grad_clip=0.0,
        trust="naive",
        trust_freq=a.steps,
        pretraining_rounds=0,
        wandb=False,
        dataset=None,
        k=3,
        lr=2e-3,
    )
    backend = SingleNodeBackend(None)
    phases = {"eval": 0.0, "save": 0.0, "aggregate": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[key] += time.perf_counter() - t

        return wrapper

    REF.lora.eval = timed(REF.lora.eval, "eval")
    if hasattr(REF.lora, "aggregate"):
        REF.lora.aggregate = timed(REF.lora.aggregate, "aggregate")
    torch.save = timed(torch.save, "save")
    tmp = tempfile.mkdtemp(prefix="trustspeed_")

    def run():
        for k in phases:
            phases[k] = 0.0
        cwd = os.getcwd()
        os.chdir(tmp)
        t = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                REF.lora.train_lora(
                    clients, data, a.steps, 1, a.batch_size, a.seq_len, a.steps, backend, extra
                )
        finally:
            os.chdir(cwd)
        total = time.perf_counter() - t
        return {
            "seconds": total,
            **{f"{k}_s": v for k, v in phases.items()},
            "train_s": total - sum(phases.values()),
        }

    torch_threads = torch.get_num_threads()
    return run, {"torch_threads": torch_threads, "torch": torch.__version__}


def setup_jax(a, hf_dir, kind):
    import jax

    from fedjax_lora import lora, models
    from fedjax_lora.algorithms import Problem
    from fedjax_lora.algorithms.trust_weighted import TrustOptions, trust_weighted
    from fedjax_lora.data.streams import stack_streams
    from fedjax_lora.engine import LocalTraining, OptimizerConfig, Strategy

    rng = np.random.default_rng(a.seed)
    model = models.load(str(hf_dir), dropout=0.2, attn_dropout=0.2)
    lora.add_lora(
        model,
        lora.LoRAConfig(
            targets=LORA_TARGETS,
            rank=a.rank,
            alpha=a.alpha,
            scaling="alpha/r",
            dropout=0.1,
            init="kaiming_uniform",
            init_fan="rank",
        ),
    )
    train = stack_streams(
        [rng.integers(0, a.vocab, a.tokens).astype(np.int32) for _ in range(a.clients)]
    )
    W = 12 * a.batch_size
    val = rng.integers(0, a.vocab, (a.clients, W, a.seq_len + 1)).astype(np.int32)
    problem = Problem.create(
        model,
        train,
        {"val": (val, np.ones((a.clients, W), bool))},
        training=LocalTraining(
            steps=a.steps,
            batch_size=a.batch_size,
            seq_len=a.seq_len,
            sampling="random",
            dropout=True,
        ),
        optimizer=OptimizerConfig(
            name="adamw",
            lr=2e-3,
            schedule="one_cycle",
            total_steps=a.steps * 1000,
            pct_start=0.02,
            div_factor=100.0,
            final_div_factor=0.05,
            weight_decay=1e-3,
        ),
        strategy=Strategy(kind),
        eval_batch_size=a.batch_size,
    )
    alg = trust_weighted(problem, "fedavg", TrustOptions(first_aggregation_round=1))
    holder = {"state": alg.init(jax.random.key(a.seed))}

    def run():
        t = time.perf_counter()
        state, metrics = alg.round(holder["state"])
        jax.block_until_ready((state, metrics))
        total = time.perf_counter() - t
        holder["state"] = state
        t = time.perf_counter()
        jax.block_until_ready(alg.evaluate(state))
        ev = time.perf_counter() - t
        return {"seconds": total, "eval_s_separate": ev, "train_s": total - ev}

    return run, {"jax": jax.__version__, "devices": str(jax.devices())}


def worker(a):
    hf_dir = Path(a.hf_dir)
    t = time.perf_counter()
    if a.worker == "ref":
        run, meta = setup_ref(a, hf_dir)
    else:
        run, meta = setup_jax(a, hf_dir, a.worker.split("-")[1])
    meta.update(
        setup_s=time.perf_counter() - t,
        setup_peak_rss_mib=peak_rss_mib(),
        setup_rss_mib=current_rss_mib(),
    )
    print(json.dumps({"ready": meta}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        res = run()
        res.update(peak_rss_mib=peak_rss_mib(), rss_mib=current_rss_mib())
        print(json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver


class Arm:
    def __init__(self, name, argv):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", name, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.meta = self._read()["ready"]

    def _read(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.name} died (exit {self.proc.poll()})")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def run(self):
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        with contextlib.suppress(Exception):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-dir", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out-dir", default=None, help="results go to OUT_DIR/parts/ ($OUT_DIR)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--arms",
        nargs="+",
        default=["ref", "jax-map", "jax-vmap"],
        choices=["ref", "jax-map", "jax-vmap"],
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    add_config_args(ap)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)

    from refimport import resolve_ref_dir

    ref_dir = str(resolve_ref_dir(a.ref_dir))
    work = Path(a.work or tempfile.mkdtemp(prefix="trustspeed_"))
    cfg = TinyGPT2(
        vocab=a.vocab, d=a.d_model, layers=a.layers, heads=a.heads, positions=a.seq_len, seed=a.seed
    )
    hf_dir = write_tiny_gpt2(work / f"gpt2_L{a.layers}_d{a.d_model}_V{a.vocab}_T{a.seq_len}", cfg)
    passthrough = ["--ref-dir", ref_dir, "--hf-dir", str(hf_dir)]
    for k, v in vars(a).items():
        if k in ("ref_dir", "work", "out_dir", "reps", "arms", "worker", "hf_dir"):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            passthrough += [flag] if v else []
        else:
            passthrough += [flag, str(v)]
    print(
        f"config: {a.clients} clients x {a.steps} steps, GPT-2 L{a.layers} d{a.d_model} "
        f"V{a.vocab}, batch {a.batch_size}x{a.seq_len}, LoRA r{a.rank}; reps {a.reps}",
        flush=True,
    )
    arms = {}
    for name in a.arms:  # sequential setup: each worker's setup peak is its own
        arms[name] = Arm(name, passthrough)
        print(f"{name}: ready {arms[name].meta}", flush=True)
    results = {name: {"meta": arm.meta, "warmup": None, "reps": []} for name, arm in arms.items()}
    for name, arm in arms.items():
        results[name]["warmup"] = arm.run()
        print(f"warm-up {name}: {results[name]['warmup']['seconds']:.2f}s", flush=True)
    for rep in range(a.reps):
        for name, arm in arms.items():
            r = arm.run()
            results[name]["reps"].append(r)
            print(
                f"rep {rep + 1} {name}: {r['seconds']:.2f}s "
                f"({a.clients * a.steps / r['seconds']:.2f} client-steps/s) "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    for arm in arms.values():
        arm.close()

    cs = a.clients * a.steps
    print(
        "\narm       | s/round min/med/max       | client-steps/s (median) | train-part s (med) "
        "| peak RSS MiB"
    )
    summary = {}
    for name, res in results.items():
        secs = np.array([r["seconds"] for r in res["reps"]])
        train = np.median([r["train_s"] for r in res["reps"]])
        summary[name] = {
            "seconds": secs.tolist(),
            "median_s": float(np.median(secs)),
            "client_steps_per_s": float(cs / np.median(secs)),
            "train_s_median": float(train),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in res["reps"]),
            "setup_peak_rss_mib": res["meta"]["setup_peak_rss_mib"],
        }
        other = {
            k: float(np.median([r[k] for r in res["reps"]]))
            for k in res["reps"][0]
            if k.endswith("_s") and k != "train_s"
        }
        summary[name]["phases_median_s"] = other
        print(
            f"{name:9s} | {secs.min():6.2f} {np.median(secs):6.2f} {secs.max():6.2f}      | "
            f"{cs / np.median(secs):8.2f}                | {train:7.2f}            | "
            f"{summary[name]['peak_rss_mib']:.0f} (after setup "
            f"{res['meta']['setup_peak_rss_mib']:.0f})  other phases (med s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in other.items())
        )
    if "ref" in results:
        for name in results:
            if name == "ref":
                continue
            ratios = np.array(
                [
                    r["seconds"] / j["seconds"]
                    for r, j in zip(results["ref"]["reps"], results[name]["reps"], strict=True)
                ]
            )
            tr = np.array(
                [
                    r["train_s"] / j["train_s"]
                    for r, j in zip(results["ref"]["reps"], results[name]["reps"], strict=True)
                ]
            )
            summary[f"speedup_{name}"] = {"round": ratios.tolist(), "train_part": tr.tolist()}
            print(
                f"speed-up {name} vs ref (ref s / jax s, per interleaved rep): round "
                f"min/med/max {ratios.min():.2f}/{np.median(ratios):.2f}/{ratios.max():.2f}; "
                f"train part {tr.min():.2f}/{np.median(tr):.2f}/{tr.max():.2f}"
            )
    R = Results("speed")
    R.speed = {
        "config": {k: v for k, v in vars(a).items() if k not in ("worker", "hf_dir", "out_dir")},
        "summary": summary,
    }
    print(f"written {R.save(a.out_dir)}")


if __name__ == "__main__":
    main()
