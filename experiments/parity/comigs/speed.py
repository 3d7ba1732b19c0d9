"""Task 3: speed of one CoMiGS-1G1S round, the reference's real training path vs fedjax_lora.

Same model and work on both sides: GPT-2 shape (4 layers, d 128, 4 heads, vocab 8192), sequence
128, batch 8, LoRA r 8 (attention + 2 experts per MLP), top-2, N clients, 10 local expert steps
per round and a router block of `--router-steps` validation steps every `--router-every` steps
(default 10 and 3: every round has the same work, the paper's τ:r = 30:10 ratio), uniform
aggregation of the generalist.

- reference: `GeneralClient.synchronize` + `GeneralClient.train` for each client in turn (its
  own memmapped data and `get_batch`), then `Server.aggregate_parameters`, fp32 on CPU (its
  bf16 autocast is CUDA-only);
- fedjax_lora: `comigs(...).round(sim)` (one compiled round: local steps of every client,
  aggregation, and the evaluation every round does, here one batch of 8 validation windows per
  client), with `Strategy("map")` and `Strategy("vmap")`.

Each side runs in its own worker process (so each has its own peak RSS); the parent builds them
one after another, runs one untimed round in each (fedjax_lora compiles there), then interleaves
timed rounds A B C, A B C, ... and reports client-steps/s (N · local steps / round seconds), the
wall-time ratios per repetition against the first worker (min / median / max), process CPU
seconds per round and peak RSS. Sides (`--workers`): `ref-t1` / `ref-t2` (torch with 1 / 2
intra-op threads: on a machine whose cores are shared with other jobs torch's 2-thread parallel
regions stall on every op, see README), `jax-map`, `jax-vmap` (XLA's default threading) and
`jax-map-t1`, `jax-vmap-t1` (XLA's intra-op parallelism off).

Run: `REF_DIR=<exported reference> python speed.py [--clients 4 8] [--reps 3]
[--workers ref-t1 jax-map jax-vmap]`
-> `$OUT_DIR/speed.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Tiny  # noqa: E402

SHAPE = Tiny(vocab=8192, d=128, layers=4, heads=4, positions=128)


def make_data(a, root: Path):
    """Random token streams per client in the reference's on-disk format (uint16)."""
    d = root / f"speed_data/{a.clients}"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    streams = {}
    for i in range(a.clients):
        for split, n in (("train", a.train_tokens), ("valid", a.val_tokens), ("test", 1024)):
            s = rng.integers(0, SHAPE.vocab, n).astype(np.uint16)
            s.tofile(d / f"{split}_{i}.bin")
            streams[(split, i)] = s.astype(np.int32)
    return d, streams


# ---------------------------------------------------------------------------------------------
# workers


class RefWorker:
    def __init__(self, a, base, data_dir):
        import inspect

        import torch

        torch.set_num_threads(a.threads)
        ref = common.import_reference()
        self.torch = torch
        strat = ref.collaboration.to_collaboration_strategy("expert_0")
        agg = ref.aggregation.to_aggregation_strategy("default")
        args = SimpleNamespace(
            learning_rate=2e-3,
            weight_decay=0.01,
            wandb_log=False,
            num_eval_steps=10**9,
            num_log_steps=10**9,
            num_router_update_steps=a.router_every,
            num_local_steps=a.steps,
            num_global_rounds=100,
            is_alternating=True,
            learning_rate_scale=1.0,
            gating_update_iters=a.router_steps,
            alter_gate_update_on_train=False,
            micro_batch_size=a.batch,
            batch_size=a.batch,
            device="cpu",
        )

        def init_model(override):
            model = ref.model.GPT(common.ref_config(ref, SHAPE, **override))
            common.load_base_into_ref(ref, model, base)
            return ref.lora.get_ft_model(model, strat)

        icml = "is_shifted" in inspect.signature(ref.clients.GeneralClient.__init__).parameters
        torch.manual_seed(42)
        self.clients = []
        for i in range(a.clients):
            override = dict(
                expert_num=2,
                lora_rank=8,
                lora_dropout=0.0,
                topk_exp=2,
                load_balancing_lambda=0.01,
                expert0_importance=0.5,
                is_no_router=False,
                device="cpu",
            )
            kw = dict(
                args=args,
                client_id=i,
                model=init_model,
                data_path=str(data_dir),
                output_dir=str(data_dir / "out"),
                override_args=override,
                seq_length=a.seq,
            )
            if icml:
                kw.update(is_shifted=True, dtype=np.uint16)
            self.clients.append(ref.clients.GeneralClient(**kw))
        self.server = ref.server.Server.__new__(ref.server.Server)
        self.server.server_model = init_model(
            dict(expert_num=2, lora_rank=8, topk_exp=2, device="cpu")
        )
        self.server.args, self.server.pruning_strength = args, 0.99
        self.strat, self.agg, self.a = strat, agg, a

    def round(self):
        for i, c in enumerate(self.clients):
            c.synchronize(self.server.server_model, self.strat, self.agg, i)
            c.train(acc_steps=1, local_num_steps=self.a.steps)
        with self.torch.no_grad():
            self.server.aggregate_parameters(
                [c.model for c in self.clients],
                self.strat,
                self.agg,
                [c.num_train_samples for c in self.clients],
            )


class JaxWorker:
    def __init__(self, a, weights_dir, streams, kind):
        import jax

        from fedjax_lora import lora
        from fedjax_lora.algorithms.comigs import BiLevel, CoMiGSOptions, comigs
        from fedjax_lora.algorithms.problem import Problem
        from fedjax_lora.data.streams import eval_windows, stack_streams
        from fedjax_lora.engine import LocalTraining, OptimizerConfig, Strategy
        from fedjax_lora.models import load
        from fedjax_lora.moe import MoEConfig

        model = load(weights_dir)
        lora.add_lora(
            model,
            lora.LoRAConfig(
                targets=("attn.c_attn", "attn.c_proj"), rank=8, alpha=16.0, scaling="alpha/sqrt(r)"
            ),
        )
        train = [streams[("train", i)] for i in range(a.clients)]
        val = [streams[("valid", i)] for i in range(a.clients)]
        problem = Problem.create(
            model,
            stack_streams(train),
            {"val": eval_windows(stack_streams(val), a.seq, 8)},
            training=LocalTraining(
                steps=a.steps, batch_size=a.batch, seq_len=a.seq, sampling="random", dropout=False
            ),
            optimizer=OptimizerConfig(
                lr=2e-3,
                schedule="cosine",
                total_steps=100 * a.steps,
                final_lr_fraction=0.1,
                weight_decay=0.01,
            ),
            strategy=Strategy(kind),
            eval_batch_size=8,
        )
        self.algo = comigs(
            problem,
            CoMiGSOptions(
                moe=MoEConfig(
                    num_experts=2, top_k=2, rank=8, alpha=16.0, lb_coef=0.01, generalist_share=0.5
                ),
                schedule=BiLevel(
                    router_every=a.router_every,
                    router_steps=a.router_steps,
                    router_optimizer=OptimizerConfig(lr=2e-3, weight_decay=0.01),
                    reference_grad_leak=a.leak,
                ),
            ),
        )
        self.sim = self.algo.init(jax.random.key(0))
        self.jax = jax

    def round(self):
        self.sim, metrics = self.algo.round(self.sim)
        self.jax.block_until_ready((self.sim, metrics))


def _cpu():
    """This process's user + system CPU seconds (all threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(a):
    out = common.out_dir()
    base = common.random_gpt2_state(SHAPE, seed=0)
    data_dir, streams = make_data(a, out)
    t0 = time.perf_counter()
    if a.worker.startswith("ref"):
        w = RefWorker(a, base, data_dir)
    else:
        weights_dir = common.save_hf_dir(out / "speed_gpt2", SHAPE, base)
        w = JaxWorker(a, weights_dir, streams, a.worker.split("-")[1])
    print(json.dumps({"ready": True, "build_s": time.perf_counter() - t0}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "round":
            c0, t0 = _cpu(), time.perf_counter()
            w.round()
            t1, c1 = time.perf_counter(), _cpu()
            print(json.dumps({"seconds": t1 - t0, "cpu_seconds": c1 - c0}), flush=True)
        elif cmd == "quit":
            print(json.dumps({"peak_rss_mib": common.peak_rss_mib()}), flush=True)
            return


# ---------------------------------------------------------------------------------------------
# parent


WORKERS = ("ref-t1", "ref-t2", "jax-map", "jax-vmap", "jax-map-t1", "jax-vmap-t1")
"""`ref-tK`: the reference with `torch.set_num_threads(K)`; `jax-<strategy>[-t1]`: fedjax_lora,
`-t1` with XLA's CPU intra-op parallelism off (one compute thread)."""


class Proc:
    def __init__(self, name, a, clients):
        threads = name.split("-t")[1] if name.startswith("ref-t") else "1"
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--clients",
            str(clients),
            "--steps",
            str(a.steps),
            "--batch",
            str(a.batch),
            "--seq",
            str(a.seq),
            "--router-every",
            str(a.router_every),
            "--router-steps",
            str(a.router_steps),
            "--threads",
            threads,
            "--train-tokens",
            str(a.train_tokens),
            "--val-tokens",
            str(a.val_tokens),
        ] + (["--leak"] if a.leak else [])
        env = dict(os.environ)
        if name.startswith("jax") and name.endswith("-t1"):
            env["XLA_FLAGS"] = (
                env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                "intra_op_parallelism_threads=1"
            ).strip()
        self.name = name
        self.p = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.ready = self._read()

    def _read(self):
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.name} died")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def round(self):
        self.p.stdin.write("round\n")
        self.p.stdin.flush()
        r = self._read()
        return r["seconds"], r["cpu_seconds"]

    def quit(self):
        self.p.stdin.write("quit\n")
        self.p.stdin.flush()
        r = self._read()["peak_rss_mib"]
        self.p.wait()
        return r


def parent(a):
    names = list(a.workers)
    if not names[0].startswith("ref"):
        raise SystemExit("the first worker is the baseline of the ratios: name a ref-tK first")
    results = {
        "config": {k: v for k, v in vars(a).items() if k != "worker"},
        "shape": SHAPE.__dict__ if hasattr(SHAPE, "__dict__") else str(SHAPE),
        "runs": {},
    }
    lines = []
    for n in a.clients_list:
        procs = []
        for name in names:  # built one after another (no competition for the 2 cores)
            procs.append(Proc(name, a, n))
            print(f"N={n} {name}: built in {procs[-1].ready['build_s']:.1f}s", flush=True)
        for pr in procs:
            for _ in range(a.warmup):
                s, c = pr.round()
                print(f"N={n} {pr.name}: warm-up round {s:.2f}s (cpu {c:.2f}s)", flush=True)
        times = {pr.name: [] for pr in procs}
        cpu = {pr.name: [] for pr in procs}
        load = []
        for rep in range(a.reps):
            load.append(os.getloadavg()[0])
            for pr in procs:
                s, c = pr.round()
                times[pr.name].append(s)
                cpu[pr.name].append(c)
            print(
                f"N={n} rep {rep} (load {load[-1]:.1f}): "
                + ", ".join(f"{k} {v[-1]:.2f}s cpu {cpu[k][-1]:.2f}s" for k, v in times.items()),
                flush=True,
            )
        rss = {pr.name: pr.quit() for pr in procs}
        steps = n * a.steps
        res = {
            "seconds": times,
            "cpu_seconds": cpu,
            "peak_rss_mib": rss,
            "loadavg_1m": load,
            "client_steps_per_s": {k: [steps / t for t in v] for k, v in times.items()},
        }
        base_name = names[0]
        for name in names[1:]:
            ratio = [r / j for r, j in zip(times[base_name], times[name], strict=True)]
            res[f"speedup_{name}_over_ref"] = {
                "min": min(ratio),
                "median": float(np.median(ratio)),
                "max": max(ratio),
                "all": ratio,
            }
            ratio = [r / j for r, j in zip(cpu[base_name], cpu[name], strict=True)]
            res[f"cpu_ratio_{name}_over_ref"] = {
                "min": min(ratio),
                "median": float(np.median(ratio)),
                "max": max(ratio),
                "all": ratio,
            }
        results["runs"][str(n)] = res
        cs = res["client_steps_per_s"]
        for k in names:
            sp = res.get(f"speedup_{k}_over_ref")
            cr = res.get(f"cpu_ratio_{k}_over_ref")
            lines.append(
                f"| {n} | {k} | {np.median(cs[k]):.3f} ({min(cs[k]):.3f}–{max(cs[k]):.3f}) | "
                + (
                    "baseline"
                    if sp is None
                    else "{min:.2f} / {median:.2f} / {max:.2f}".format(**sp)
                )
                + " | "
                + ("baseline" if cr is None else "{median:.2f}".format(**cr))
                + " | "
                + f"{np.median(cpu[k]):.1f} | {rss[k]:.0f} | "
                + f"{min(load):.1f}–{max(load):.1f} |"
            )
    out = common.out_dir()
    (out / "speed.json").write_text(json.dumps(results, indent=1))
    head = (
        f"| N | side | client-steps/s median (min–max) | wall speed-up over {names[0]} "
        "min / median / max | CPU-time ratio (median) | CPU s per round | peak RSS MiB | "
        "load avg |\n|---|---|---|---|---|---|---|---|"
    )
    table = head + "\n" + "\n".join(lines)
    (out / "speed.md").write_text(table + "\n")
    print(table)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, choices=[None, *WORKERS])
    p.add_argument(
        "--workers",
        nargs="+",
        default=["ref-t1", "jax-map", "jax-vmap"],
        choices=WORKERS,
        help="sides to time; the first is the ratios' baseline",
    )
    p.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--router-every", type=int, default=10)
    p.add_argument("--router-steps", type=int, default=3)
    p.add_argument("--leak", action="store_true", help="fedjax_lora with reference_grad_leak")
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--train-tokens", type=int, default=50_000)
    p.add_argument("--val-tokens", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds per worker (jax: the first one compiles)",
    )
    a = p.parse_args()
    if a.worker:
        a.clients = a.clients[0]
        worker(a)
    else:
        a.clients_list = a.clients
        parent(a)


if __name__ == "__main__":
    main()
