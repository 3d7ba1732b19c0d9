"""Engine throughput benchmark: client-steps per second of the client-parallel strategies.

Every contender does the same per-client work: N clients, each taking K local adamw steps
(`lax.scan` inside jit) on B random windows of T tokens drawn from its own token stream, on one
frozen GPT-2-like base with LoRA on the q and v slices of `c_attn`. Contenders:

- the engine strategies (`vmap`, `map`, `chunked`, `sharded`): one jitted `train_clients` call
  over the stacked clients, clients' buffers donated;
- `python_loop`: a Python loop over the N clients and their K steps calling one jitted
  single-client optimizer step (the user's loop), buffers donated, one sync at the end;
- `python_loop_scan`: a stricter loop: one jitted call per client running its K steps in a
  `lax.scan` (the engine's per-client program, dispatched from Python);
- `big_batch`: one adapter trained on all N clients' windows at once (batch N·B, the same
  per-client sampling), K steps in `lax.scan`; one big step counts as N client-steps.

Each (contender, N) runs in a fresh subprocess, so its peak RSS (`ru_maxrss`) is its own. Compile
time is AOT `lower().compile()` (trace included), with no persistent compilation cache. Throughput
is the median over `--reps` timed calls after `--warmup` untimed ones. On a shared machine use
`--interleave` (one process per N, contenders timed round-robin) for fair ratios.

Two more sections (`--sections`):

- `scaling`: the `chunked` strategy (and any of `--scaling-strategies`) at N up to 1024 clients,
  one fresh process per N: client-steps per second and peak RSS, so memory is seen to grow with
  the chunk, not with N (`--scaling-steps` local steps per call);
- `breakdown`: one round's pieces, each its own compiled program timed on the same clients: local
  training (K steps), FedAvg aggregation, trust aggregation (an N×N mixing matrix), evaluation
  of every client on its fixed windows, and the N×N cross-evaluation the trust rules need.

`--plot` (default: the JSON path with `.png`) draws throughput against N, the scaling curve with
its peak RSS, and the round breakdown.

    python experiments/benchmarks/engine.py --json experiments/benchmarks/results/engine_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINE_STRATEGIES = ("vmap", "map", "chunked", "sharded")
BASELINES = ("python_loop", "python_loop_scan", "big_batch")

# The probe of docs (research/environment.md §3): GPT-2-like, 4 layers, d=128, V=8192, 8x128.
FULL = {
    "vocab_size": 8192,
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 4,
    "d_ff": 512,
    "seq_len": 128,
    "batch_size": 8,
    "rank": 8,
    "stream_len": 4096,
    "steps": 4,
    "reps": 3,
    "warmup": 1,
    "num_clients": [1, 8, 32],
}
QUICK = {
    "vocab_size": 256,
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "d_ff": 64,
    "seq_len": 16,
    "batch_size": 2,
    "rank": 4,
    "stream_len": 256,
    "steps": 2,
    "reps": 1,
    "warmup": 1,
    "num_clients": [2],
}
# The scale issue's GPU measurement: GPT-2 124M (bf16 base), LoRA r=8 on q and v, 64 clients of
# 8 windows x 256 tokens a step.
GPU = {
    "vocab_size": 50257,
    "d_model": 768,
    "n_layers": 12,
    "n_heads": 12,
    "d_ff": 3072,
    "seq_len": 256,
    "batch_size": 8,
    "rank": 8,
    "stream_len": 8192,
    "steps": 4,
    "reps": 3,
    "warmup": 1,
    "num_clients": [64],
    "dtype": "bfloat16",
}
PRESETS = {"full": FULL, "quick": QUICK, "gpu": GPU}
SCALING = {"full": [32, 128, 256, 512, 1024], "quick": [2, 4], "gpu": [64, 256, 1024]}
BREAKDOWN = {"full": [8, 32], "quick": [2], "gpu": [64]}
EVAL_WINDOWS = 16  # fixed evaluation windows per client in the breakdown
TARGETS = ("c_attn.q", "c_attn.v")


def model_flops_per_token(c: dict) -> float:
    """Training FLOPs per token of a frozen GPT-2 base with LoRA, PaLM's convention (Chowdhery
    et al. 2022, App. B) without weight gradients: forward `2·P` plus backward `2·P` for the
    activation gradients (frozen weights take none), `P = L·(4d² + 2·d·d_ff) + d·V` the matmul
    parameters (head included), plus attention scores and mixing, `12·L·T·d` (forward `4·L·T·d`,
    backward twice that). LoRA's own FLOPs (< 1 % here) are left out."""
    d, layers, t = c["d_model"], c["n_layers"], c["seq_len"]
    matmul_params = layers * (4 * d * d + 2 * d * c["d_ff"]) + d * c["vocab_size"]
    return 4.0 * matmul_params + 12.0 * layers * t * d


def _device_peak_gb() -> float | None:
    """Peak bytes in use on the first accelerator (None where the backend keeps no statistics,
    e.g. the CPU: there `peak_rss_gb` is the memory)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1024**3


def _rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# --------------------------------------------------------------------------------------------
# Worker: one (contender, N) in this process.
# --------------------------------------------------------------------------------------------


def setup(c: dict, n: int) -> dict:
    """The frozen base with LoRA slots, the optimizer, the per-client update and N clients' data."""
    import jax.numpy as jnp
    import numpy as np

    from fedjax_lora import lora
    from fedjax_lora.engine import LocalTraining, OptimizerConfig, make_client_update
    from fedjax_lora.engine.train import training_loss
    from fedjax_lora.models.config import ModelConfig
    from fedjax_lora.models.factory import from_config

    cfg = ModelConfig(
        family="gpt2",
        vocab_size=c["vocab_size"],
        d_model=c["d_model"],
        n_layers=c["n_layers"],
        n_heads=c["n_heads"],
        d_ff=c["d_ff"],
        max_positions=c["seq_len"],
    )
    model = from_config(cfg, dtype=jnp.dtype(c.get("dtype", "float32")), seed=0)
    lora.add_lora(model, lora.LoRAConfig(targets=TARGETS, rank=c["rank"]))
    graphdef, template, base = lora.split(model)
    tx = OptimizerConfig(name="adamw", lr=1e-3).build()
    training = LocalTraining(
        steps=c["steps"],
        batch_size=c["batch_size"],
        seq_len=c["seq_len"],
        dropout=False,
        remat=c.get("remat", False),
        ce_chunk=c.get("ce_chunk"),
    )
    max_windows = c["stream_len"] // c["seq_len"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, c["vocab_size"], (n, c["stream_len"]))
    return {
        "graphdef": graphdef,
        "template": template,
        "base": base,
        "tx": tx,
        "max_windows": max_windows,
        "update": make_client_update(graphdef, tx, training, max_windows=max_windows),
        "single_step": make_client_update(
            graphdef, tx, dataclasses.replace(training, steps=1), max_windows=max_windows
        ),
        "tokens": jnp.asarray(tokens, jnp.int32),
        "lengths": jnp.full((n,), c["stream_len"], jnp.int32),
        "loss": training_loss(training),
    }


def prepare_contender(kind: str, n: int, c: dict, env: dict) -> dict:
    """Compiles one contender over N fresh clients: `call(state) -> (state, losses)`, its first
    state, compile seconds and trainable parameters per client."""
    import jax
    import jax.numpy as jnp
    import optax

    from fedjax_lora.engine import (
        Strategy,
        init_clients,
        sample_starts,
        train_clients,
        windows_at,
    )

    t_len, b, k = c["seq_len"], c["batch_size"], c["steps"]
    graphdef, base, tx, update = env["graphdef"], env["base"], env["tx"], env["update"]
    tokens, lengths, max_windows = env["tokens"], env["lengths"], env["max_windows"]
    clients = init_clients(env["template"], tx, n, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(clients.params)) // n

    if kind in ENGINE_STRATEGIES:
        strategy = Strategy(kind=kind, chunk_size=c["chunk_size"])
        strategy.check_clients(n)
        clients, tokens, lengths = strategy.place((clients, tokens, lengths))
        fn = jax.jit(
            lambda cl, tok, ln, bs: train_clients(update, strategy, cl, tok, ln, None, bs),
            donate_argnums=0,
        )
        t0 = time.perf_counter()
        compiled = fn.lower(clients, tokens, lengths, base).compile()
        compile_s = time.perf_counter() - t0
        state = clients

        def call(state):
            out, metrics = compiled(state, tokens, lengths, base)
            jax.block_until_ready((out, metrics))
            return out, metrics["train_loss"]

    elif kind in ("python_loop", "python_loop_scan"):
        # python_loop: the user's loop, one jitted single-client optimizer step per call, K calls
        # per client; python_loop_scan: one jitted call per client running its K steps in scan.
        step_fn = env["single_step"] if kind == "python_loop" else update
        calls = c["steps"] if kind == "python_loop" else 1
        fn = jax.jit(lambda cl, tok, ln, bs: step_fn(cl, tok, ln, None, bs), donate_argnums=0)
        state = [jax.tree.map(lambda x, i=i: x[i], clients) for i in range(n)]
        rows = [tokens[i] for i in range(n)]
        rows_len = [lengths[i] for i in range(n)]
        del clients
        t0 = time.perf_counter()
        compiled = fn.lower(state[0], rows[0], rows_len[0], base).compile()
        compile_s = time.perf_counter() - t0

        def call(state):
            outs = []
            for s, tok, ln in zip(state, rows, rows_len, strict=True):
                losses = []
                for _ in range(calls):
                    s, metrics = compiled(s, tok, ln, base)
                    losses.append(metrics["train_loss"])
                outs.append((s, jnp.concatenate(losses)))
            jax.block_until_ready(outs)
            return [o[0] for o in outs], jnp.stack([o[1] for o in outs])

    elif kind == "big_batch":
        loss_fn = env["loss"]  # the clients' loss, memory settings (remat, ce_chunk) included
        value_and_grad = jax.value_and_grad(
            lambda p, bs, batch: loss_fn(graphdef, p, bs, batch, None), has_aux=True
        )

        def client_windows(key, row, row_len):
            starts = sample_starts(
                key,
                row_len,
                jnp.int32(0),
                batch_size=b,
                seq_len=t_len,
                max_windows=max_windows,
                sampling="random",
            )
            return windows_at(row, starts, t_len, None)

        def big_update(carry, tok, ln, bs):
            def step(carry, _):
                params, opt_state, key = carry
                key, k_batch = jax.random.split(key)
                batch = jax.vmap(client_windows)(jax.random.split(k_batch, n), tok, ln)
                batch = jax.tree.map(lambda x: x.reshape(n * b, *x.shape[2:]), batch)
                (loss, _), grads = value_and_grad(params, bs, batch)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state, key), loss

            return jax.lax.scan(step, carry, None, length=k)

        fn = jax.jit(big_update, donate_argnums=0)
        one = jax.tree.map(lambda x: x[0], clients)
        state = (one.params, one.opt_state, one.rng)
        del clients, one
        t0 = time.perf_counter()
        compiled = fn.lower(state, tokens, lengths, base).compile()
        compile_s = time.perf_counter() - t0

        def call(state):
            out = compiled(state, tokens, lengths, base)
            jax.block_until_ready(out)
            return out

    else:
        raise ValueError(f"unknown contender {kind!r}")
    return {
        "call": call,
        "state": state,
        "compile_s": compile_s,
        "n_params": int(n_params),
        "xla_memory_gb": xla_memory_gb(compiled),
    }


def xla_memory_gb(compiled) -> dict | None:
    """XLA's memory plan of one compiled program (GB): `argument` (inputs: client states, tokens,
    base), `output`, `temp` (activations and other scratch; what grows with the vmapped width)
    and `alias` (donated inputs reused as outputs). The program's own numbers, unlike a process's
    peak; None where the backend gives no analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    parts = ("argument", "output", "temp", "alias")
    return {k: getattr(stats, f"{k}_size_in_bytes") / 1024**3 for k in parts}


def timed_call(prepared: dict) -> float:
    """One call of a prepared contender (its state advanced in place); wall seconds."""
    t0 = time.perf_counter()
    prepared["state"], prepared["losses"] = prepared["call"](prepared["state"])
    return time.perf_counter() - t0


def result_row(
    kind: str, n: int, c: dict, prepared: dict, times: list[float], cpu: float, load: float
) -> dict:
    import jax
    import numpy as np

    losses = np.asarray(prepared["losses"])
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"{kind} N={n}: non-finite training loss")
    # Every contender: N clients x K steps of B windows per call (big_batch: K steps of N*B).
    steps_per_call = n * c["steps"]
    median = statistics.median(times)
    sps = steps_per_call / median
    tokens_per_s = sps * c["batch_size"] * c["seq_len"]
    model_tflops = tokens_per_s * model_flops_per_token(c) / 1e12
    peak = c.get("peak_tflops")
    return {
        "strategy": kind,
        "num_clients": n,
        "client_steps_per_s": sps,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": model_tflops,
        "mfu": model_tflops / peak if peak else None,
        "peak_rss_gb": _rss_gb(),
        "device_peak_gb": _device_peak_gb(),
        "compile_s": prepared["compile_s"],
        "xla_memory_gb": prepared["xla_memory_gb"],
        "call_s_median": median,
        "call_s": times,
        "client_steps_per_call": steps_per_call,
        "cpu_utilization": cpu / sum(times),  # process CPU seconds per wall second, timed reps
        "loadavg_1min": [load, os.getloadavg()[0]],  # before and after the timed calls
        "trainable_params_per_client": prepared["n_params"],
        "final_loss": float(losses.mean()),
        "devices": len(jax.devices()),
    }


def run_contender(kind: str, n: int, c: dict, env: dict, trace_dir: Path | None = None) -> dict:
    """Compiles one contender, warms it up and times `reps` calls; one result row. With
    `trace_dir`, one more call runs under `jax.profiler.trace` (untimed) and writes its trace
    there (TensorBoard / XProf's `plugins/profile` layout)."""
    prepared = prepare_contender(kind, n, c, env)
    for _ in range(c["warmup"]):
        timed_call(prepared)
    cpu, load = time.process_time(), os.getloadavg()[0]
    times = [timed_call(prepared) for _ in range(c["reps"])]
    row = result_row(kind, n, c, prepared, times, time.process_time() - cpu, load)
    if trace_dir is not None:
        import jax

        with jax.profiler.trace(str(trace_dir)):
            timed_call(prepared)
    return row


def run_interleaved(kinds: list[str], n: int, c: dict, env: dict) -> list[dict]:
    """All contenders compiled and warmed up in this process, then timed round-robin (rotating
    the order each rep), so a fluctuating machine load hits every contender alike."""
    prepared = {}
    for kind in kinds:
        prepared[kind] = prepare_contender(kind, n, c, env)
        for _ in range(c["warmup"]):
            timed_call(prepared[kind])
    times = {kind: [] for kind in kinds}
    cpu, load = dict.fromkeys(kinds, 0.0), os.getloadavg()[0]
    for rep in range(c["reps"]):
        for kind in kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]:
            t0 = time.process_time()
            times[kind].append(timed_call(prepared[kind]))
            cpu[kind] += time.process_time() - t0
    return [result_row(k, n, c, prepared[k], times[k], cpu[k], load) for k in kinds]


def _median_seconds(fn, args, reps: int) -> tuple[float, float]:
    """`(compile seconds, median seconds of reps calls)` of `jit(fn)(*args)`."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def run_breakdown(n: int, c: dict, env: dict) -> dict:
    """One round's pieces for N clients, each compiled and timed on its own: local training,
    FedAvg and trust aggregation, evaluation, cross-evaluation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fedjax_lora.aggregation import fedavg_aggregator, trust_aggregator
    from fedjax_lora.engine import (
        Strategy,
        evaluate_clients,
        init_clients,
        make_client_eval,
        make_eval_set,
        train_clients,
    )
    from fedjax_lora.engine.crosseval import make_cross_eval

    strategy = Strategy(kind=c["breakdown_strategy"], chunk_size=c["chunk_size"])
    graphdef, base, update = env["graphdef"], env["base"], env["update"]
    clients = init_clients(env["template"], env["tx"], n, jax.random.key(0))
    rng = np.random.default_rng(1)
    windows = rng.integers(0, c["vocab_size"], (n, EVAL_WINDOWS, c["seq_len"] + 1))
    eval_set = make_eval_set(windows, np.ones((n, EVAL_WINDOWS), bool), c["batch_size"])
    client_eval = make_client_eval(graphdef, c["batch_size"])
    cross = make_cross_eval(graphdef, c["batch_size"], strategy)
    fedavg, trust = fedavg_aggregator(), trust_aggregator("validation")
    ppl = jnp.asarray(rng.uniform(10.0, 20.0, (n, n)), jnp.float32)
    pieces = {
        "local_steps": (
            lambda cl, tok, ln, bs: train_clients(update, strategy, cl, tok, ln, None, bs),
            (clients, env["tokens"], env["lengths"], base),
        ),
        "aggregation_fedavg": (
            lambda p: fedavg.apply(p, fedavg.init(p))[0],
            (clients.params,),
        ),
        "aggregation_trust": (
            lambda p, m: trust.apply(p, trust.init(p), {"ppl": m})[0],
            (clients.params, ppl),
        ),
        "evaluation": (
            lambda p, es, bs: evaluate_clients(client_eval, strategy, p, es, bs),
            (clients.params, eval_set, base),
        ),
        "cross_evaluation": (
            lambda p, es, bs: cross.perplexity(p, es, bs),
            (clients.params, eval_set, base),
        ),
    }
    seconds, compile_s = {}, {}
    for name, (fn, args) in pieces.items():
        compile_s[name], seconds[name] = _median_seconds(fn, args, c["reps"])
    fedavg_round = seconds["local_steps"] + seconds["aggregation_fedavg"] + seconds["evaluation"]
    trust_round = (
        seconds["local_steps"]
        + seconds["cross_evaluation"]
        + seconds["aggregation_trust"]
        + seconds["evaluation"]
    )
    return {
        "num_clients": n,
        "strategy": strategy.kind,
        "seconds": seconds,
        "compile_s": compile_s,
        "fedavg_round_s": fedavg_round,
        "trust_round_s": trust_round,
        "share_of_trust_round": {k: v / trust_round for k, v in seconds.items()},
        "eval_windows_per_client": EVAL_WINDOWS,
        "peak_rss_gb": _rss_gb(),
        "devices": len(jax.devices()),
    }


def worker(spec: dict) -> list[dict]:
    """Runs `spec["contenders"]` (or the `breakdown` section) for `spec["num_clients"]` in this
    process."""
    import jax

    jax.devices()
    rss_start = _rss_gb()
    n, c = spec["num_clients"], spec["config"]
    env = setup(c, n)
    if spec.get("section") == "breakdown":
        row = run_breakdown(n, c, env)
        row["rss_after_import_gb"] = rss_start
        return [row]
    if c.get("interleave"):
        rows = run_interleaved(spec["contenders"], n, c, env)
    else:
        rows = [run_contender(kind, n, c, env) for kind in spec["contenders"]]
    for row in rows:
        row["rss_after_import_gb"] = rss_start
    return rows


# --------------------------------------------------------------------------------------------
# Driver: one subprocess per (contender, N), then a table and the JSON file.
# --------------------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError):
        mem_gb = None
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; print(repr(jax.devices()))"],
        env=_worker_env(None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_version": versions["jax"],
        "versions": versions,
        "devices": probe.stdout.strip() or probe.stderr.strip()[-500:],
    }


def _worker_env(host_devices: int | None, keep_cache: bool = False) -> dict:
    """A clean JAX environment: forced host devices only for `sharded` (a caller's XLA_FLAGS, e.g.
    the test session's, are dropped) and no persistent compilation cache unless `keep_cache`."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if not keep_cache:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    if host_devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={host_devices}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_subprocess(spec: dict, timeout: float) -> list[dict]:
    host_devices = spec["config"]["host_devices"] if "sharded" in spec["contenders"] else None
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        env=_worker_env(host_devices, keep_cache=spec["config"]["quick"]),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"worker {spec['contenders']} N={spec['num_clients']} failed: {tail}")
    return json.loads(lines[-1])


def summarize(results: list[dict], strategies: list[str]) -> dict:
    """Per N: the best engine strategy against the Python loop and the big batch."""
    out = {}
    for n in sorted({r["num_clients"] for r in results}):
        rows = {r["strategy"]: r for r in results if r["num_clients"] == n}
        engine = [rows[s] for s in strategies if s in rows]
        if not engine:
            continue
        best = max(engine, key=lambda r: r["client_steps_per_s"])
        entry = {"best_strategy": best["strategy"], "best_steps_per_s": best["client_steps_per_s"]}
        for base in BASELINES:
            if base in rows:
                entry[f"best_vs_{base}"] = (
                    best["client_steps_per_s"] / rows[base]["client_steps_per_s"]
                )
        out[str(n)] = entry
    return out


def format_table(results: list[dict]) -> str:
    head = (
        f"{'N':>3}  {'contender':<12} {'steps/s':>8} {'tok/s':>8} {'x loop':>7} {'x big':>6} "
        f"{'peak RSS GB':>11} {'compile s':>9}"
    )
    lines = [head, "-" * len(head)]
    for n in sorted({r["num_clients"] for r in results}):
        rows = [r for r in results if r["num_clients"] == n]
        ref = {r["strategy"]: r["client_steps_per_s"] for r in rows}
        for r in rows:
            sps = r["client_steps_per_s"]
            loop = f"{sps / ref['python_loop']:.2f}" if "python_loop" in ref else "-"
            big = f"{sps / ref['big_batch']:.2f}" if "big_batch" in ref else "-"
            lines.append(
                f"{n:>3}  {r['strategy']:<12} {sps:>8.2f} {r['tokens_per_s']:>8.0f} {loop:>7} "
                f"{big:>6} {r['peak_rss_gb']:>11.2f} {r['compile_s']:>9.2f}"
            )
    return "\n".join(lines)


def format_scaling(rows: list[dict]) -> str:
    head = f"{'N':>5}  {'strategy':<9} {'steps/s':>8} {'peak RSS GB':>11} {'compile s':>9}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["strategy"], r["num_clients"])):
        lines.append(
            f"{r['num_clients']:>5}  {r['strategy']:<9} {r['client_steps_per_s']:>8.2f} "
            f"{r['peak_rss_gb']:>11.2f} {r['compile_s']:>9.2f}"
        )
    return "\n".join(lines)


def format_breakdown(rows: list[dict]) -> str:
    names = list(rows[0]["seconds"]) if rows else []
    head = f"{'N':>4}  " + " ".join(f"{k:>18}" for k in names) + f" {'peak RSS GB':>11}"
    lines = [head + "   (seconds per call)", "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r['seconds'][k]:>18.4f}" for k in names)
        lines.append(f"{r['num_clients']:>4}  {cells} {r['peak_rss_gb']:>11.2f}")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Throughput of every contender against N, the scaling curve with its peak RSS, and the
    round breakdown (stacked seconds per piece)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    panels = [k for k in ("results", "scaling", "breakdown") if doc.get(k)]  # measured ones
    if not panels:
        raise ValueError("the benchmark document holds no results, scaling or breakdown rows")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = dict(zip(panels, axes[0], strict=True))
    if "results" in axes:
        ax = axes["results"]
        for kind in sorted({r["strategy"] for r in doc["results"]}):
            rows = sorted(
                (r for r in doc["results"] if r["strategy"] == kind),
                key=lambda r: r["num_clients"],
            )
            ns = [r["num_clients"] for r in rows]
            ax.plot(ns, [r["client_steps_per_s"] for r in rows], "o-", label=kind)
        ax.set(xscale="log", xlabel="clients N", ylabel="client-steps / s")
        ax.set_title("strategies compared (higher is better)", fontsize=10)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    if "scaling" in axes:
        ax = axes["scaling"]
        handles = []
        for kind in sorted({r["strategy"] for r in doc["scaling"]}):
            rows = sorted(
                (r for r in doc["scaling"] if r["strategy"] == kind),
                key=lambda r: r["num_clients"],
            )
            ns = [r["num_clients"] for r in rows]
            handles += ax.plot(ns, [r["client_steps_per_s"] for r in rows], "o-",
                               label=f"{kind}: client-steps / s")  # fmt: skip
            twin = ax.twinx()
            handles += twin.plot(ns, [r["peak_rss_gb"] for r in rows], "s--", color="tab:red",
                                 label=f"{kind}: peak RSS (GB)")  # fmt: skip
            twin.set_ylabel("peak RSS (GB)", color="tab:red")
            twin.set_ylim(bottom=0)
        ax.set(xscale="log", xlabel="clients N", ylabel="client-steps / s")
        ax.set_title("throughput and memory against N", fontsize=10)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    if "breakdown" in axes:
        ax = axes["breakdown"]
        rows = doc["breakdown"]
        bottom = [0.0] * len(rows)
        labels = [f"N={r['num_clients']}" for r in rows]
        for name in rows[0]["seconds"]:
            heights = [r["seconds"][name] for r in rows]
            ax.bar(labels, heights, bottom=bottom, label=name)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.legend(fontsize=7)
        ax.set(xlabel="population", ylabel="seconds per call")
        ax.set_title("one round, piece by piece", fontsize=10)
    fig.suptitle(f"{doc['machine']['cpu']}, {doc['machine']['cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--num-clients", type=int, nargs="+")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="full",
        help="model and sizes: full (the CPU benchmark), quick (tests), gpu (GPT-2 124M, N=64)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak for the base's dtype (e.g. H200 bf16 dense: 989); adds `mfu`",
    )
    p.add_argument(
        "--strategies", nargs="+", default=["vmap", "map", "chunked"], choices=ENGINE_STRATEGIES
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        default=list(BASELINES),
        choices=BASELINES,
        help="reference contenders (default: both)",
    )
    p.add_argument("--steps", type=int, help="local steps K per call (lax.scan)")
    p.add_argument("--reps", type=int, help="timed calls; the median is reported")
    p.add_argument("--warmup", type=int, help="untimed calls after compilation")
    p.add_argument("--chunk-size", type=int, default=4, help="clients per vmap of `chunked`")
    p.add_argument("--host-devices", type=int, default=2, help="forced CPU devices of `sharded`")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, N=2, all contenders of one N in one process (the smoke test)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="one process per N, contenders timed round-robin (fair under a varying load; "
        "peak RSS then cumulative)",
    )
    p.add_argument(
        "--one-process",
        action="store_true",
        help="run all contenders of one N in one subprocess (faster; peak RSS then cumulative)",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        default=["contenders", "scaling", "breakdown"],
        choices=("contenders", "scaling", "breakdown"),
    )
    p.add_argument("--scaling-clients", type=int, nargs="+", help="N of the scaling section")
    p.add_argument(
        "--scaling-strategies", nargs="+", default=["chunked"], choices=ENGINE_STRATEGIES[:3]
    )
    p.add_argument("--scaling-steps", type=int, default=1, help="local steps per scaling call")
    p.add_argument("--breakdown-clients", type=int, nargs="+", help="N of the breakdown section")
    p.add_argument("--breakdown-strategy", default="map", choices=ENGINE_STRATEGIES[:3])
    p.add_argument("--plot", type=Path, help="figure path (default: the JSON path with .png)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    size = "quick" if args.quick else args.preset
    config = {"dtype": "float32", **PRESETS[size]}
    for name in ("num_clients", "steps", "reps", "warmup"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    config.update(
        preset=size,
        peak_tflops=args.peak_tflops,
        sections=args.sections,
        scaling_clients=args.scaling_clients or SCALING[size],
        scaling_strategies=args.scaling_strategies,
        scaling_steps=args.scaling_steps,
        breakdown_clients=args.breakdown_clients or BREAKDOWN[size],
        breakdown_strategy=args.breakdown_strategy,
        chunk_size=args.chunk_size,
        host_devices=args.host_devices,
        quick=args.quick,
        compile_cache=(
            "caller's JAX_COMPILATION_CACHE_DIR kept"
            if args.quick and os.environ.get("JAX_COMPILATION_CACHE_DIR")
            else "none"
        ),
        interleave=args.interleave,
        isolation=(
            "one process per N" if args.quick or args.one_process or args.interleave else "process"
        ),
        lora_targets=list(TARGETS),
        optimizer="adamw",
        donated=True,
        sampling="random windows with replacement",
        timing="median of reps after warmup; compile = AOT lower().compile()",
        command=" ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
    )
    contenders = [*args.strategies, *args.baselines]
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['jax_version']}")
    results, skipped, sections = [], [], {"scaling": [], "breakdown": []}
    t_all = time.perf_counter()
    save = lambda: (
        args.json
        and _write(args.json, machine, config, results, skipped, args.strategies, sections)
    )
    for n in config["num_clients"] if "contenders" in args.sections else []:
        runnable = []
        for kind in contenders:
            if kind == "sharded" and n % args.host_devices:
                skipped.append({"strategy": kind, "num_clients": n, "reason": "N % devices != 0"})
            else:
                runnable.append(kind)
        if config["isolation"] == "process":
            groups = [[kind] for kind in runnable]
        else:  # one process per N (sharded apart: it needs forced host devices)
            groups = [
                [k for k in runnable if k != "sharded"],
                [k for k in runnable if k == "sharded"],
            ]
        for group in filter(None, groups):
            t0 = time.perf_counter()
            spec = {"contenders": group, "num_clients": n, "config": config}
            rows = run_subprocess(spec, args.timeout)
            results.extend(rows)
            for row in rows:
                print(
                    f"  N={n:<3} {row['strategy']:<12} {row['client_steps_per_s']:8.2f} steps/s  "
                    f"peak {row['peak_rss_gb']:.2f} GB  compile {row['compile_s']:.2f} s  "
                    f"cpu {row['cpu_utilization']:.2f}  load {row['loadavg_1min'][1]:.1f}",
                    flush=True,
                )
            print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)
            save()
    scaling_config = {**config, "steps": args.scaling_steps}
    for kind in config["scaling_strategies"] if "scaling" in args.sections else []:
        for n in config["scaling_clients"]:
            spec = {"contenders": [kind], "num_clients": n, "config": scaling_config}
            row = run_subprocess(spec, args.timeout)[0]
            sections["scaling"].append(row)
            print(
                f"  scaling {kind} N={n:<5} {row['client_steps_per_s']:8.2f} steps/s  peak "
                f"{row['peak_rss_gb']:.2f} GB",
                flush=True,
            )
            save()
    for n in config["breakdown_clients"] if "breakdown" in args.sections else []:
        spec = {"section": "breakdown", "contenders": [], "num_clients": n, "config": config}
        row = run_subprocess(spec, args.timeout)[0]
        sections["breakdown"].append(row)
        parts = ", ".join(f"{k} {v:.3f}s" for k, v in row["seconds"].items())
        print(f"  breakdown N={n}: {parts}", flush=True)
        save()
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s\n")
    if results:
        print(format_table(results))
    summary = summarize(results, args.strategies)
    for n, s in summary.items():
        parts = [f"N={n}: best engine strategy {s['best_strategy']}"]
        parts += [f"{v:.2f}x {k[8:]}" for k, v in s.items() if k.startswith("best_vs_")]
        print(", ".join(parts))
    if sections["scaling"]:
        print("\n" + format_scaling(sections["scaling"]))
    if sections["breakdown"]:
        print("\n" + format_breakdown(sections["breakdown"]))
    if args.json:
        doc = _write(args.json, machine, config, results, skipped, args.strategies, sections)
        figure = args.plot or args.json.with_suffix(".png")
        plot(doc, figure)
        print(f"wrote {args.json} and {figure}")
    return 0


def _write(path: Path, machine, config, results, skipped, strategies, sections) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": machine,
        "config": config,
        "results": results,
        "skipped": skipped,
        "summary": summarize(results, strategies),
        **sections,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    sys.exit(main())
