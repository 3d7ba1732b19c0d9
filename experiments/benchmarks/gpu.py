"""The accelerator measurement of the scale issue, in one bounded command.

Sections, each in its own process under its own time budget (`--budgets`; a section that runs out
is stopped, keeps the rows it finished and says so in `sections[name]`):

1. `contenders`: GPT-2 124M sizes (random weights, bf16 base), LoRA r=8 on q and v, N=64 clients
   x 8 windows x 256 tokens a step, K local steps a call: `chunked` at a few chunk sizes, `vmap`
   (remat + chunked head), the big-batch step over the same N·8·256 tokens, and the Python loop
   over a jitted single-client step (`engine.py`'s contenders): client-steps/s, tokens/s, model
   FLOP/s and MFU (`engine.model_flops_per_token`), compile seconds, XLA's memory plan of each
   program (`xla_memory_gb`) and the device's peak memory so far (`device_peak_gb`).
2. `scaling`: `chunked` at N = 64, 256, 1024 (one local step a call): XLA's `temp` memory (the
   activations) must stay that of one chunk while `argument` (the stacked client states) grows.
3. `methods`: one round of each method family at N=64 on the same model and clients (fedavg,
   pcl-val with its N×N cross-evaluation, comigs 1G1S, fedamole, hetlora, flexlora): seconds per
   round (the second round; the first compiles) and the cost relative to plain LoRA FedAvg.
4. `reference`: the authors' trust-weighted loop on the same device, through the parity harness
   (`--ref-harness`, with the reference tree in `--ref-dir`); skipped, saying why, when either is
   absent.

Then the issue's goals are evaluated (`goals`: each with its target, the measured value and
`met`), and the JSON, a Markdown table (`.md`) and a figure (`.png`) are written side by side.
`--smoke` runs every section on engine.py's tiny `quick` model (seconds, CPU), the test suite's
dry run.

    python experiments/benchmarks/gpu.py            # on the GPU: results/engine_<device>.json
    python experiments/benchmarks/gpu.py --smoke --json /tmp/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import engine  # noqa: E402

SECTIONS = ("contenders", "scaling", "methods", "reference")
# Dense bf16 peak TFLOP/s by device kind (NVIDIA data sheets, SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# The sizes on the GPU; `--smoke`: engine.py's `quick` model, every section in seconds.
GPU = {
    **engine.GPU,
    "steps": 4,
    "reps": 3,
    "warmup": 1,
    "num_clients": 64,
    "chunk_sizes": [8, 16, 4],
    "ce_chunk": 8192,
    "scaling_clients": [64, 1024, 256],  # the goal's pair first
    "scaling_chunk": 8,
    "method_clients": 64,
    "method_steps": 4,
    "eval_windows": 4,
    "amole": {"num_experts": 32, "clients_per_expert": 4, "min_experts": 2, "max_experts": 8},
    "budgets": {"contenders": 130, "scaling": 90, "methods": 180, "reference": 20},
}
SMOKE = {
    **engine.QUICK,
    "dtype": "float32",
    "steps": 2,
    "reps": 1,
    "warmup": 0,
    "num_clients": 4,
    "chunk_sizes": [2],
    "ce_chunk": 16,
    "scaling_clients": [4, 8],
    "scaling_chunk": 2,
    "method_clients": 4,
    "method_steps": 1,
    "eval_windows": 2,
    "amole": {"num_experts": 4, "clients_per_expert": 2, "min_experts": 2, "max_experts": 4},
    "budgets": {"contenders": 120, "scaling": 120, "methods": 240, "reference": 30},
}
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
METHODS = ("fedavg", "pcl-val", "comigs", "fedamole", "hetlora", "flexlora")
# What each method computes beyond plain LoRA FedAvg by its definition (goal 4's exceptions).
EXTRA_WORK = {
    "pcl-val": "N×N cross-evaluation: every client's adapters on every client's validation windows",
    "comigs": "a LoRA-expert mixture on every MLP (2 experts, top-2) and a router step on the "
    "validation split after every expert step (bi-level)",
    "fedamole": "a mixture of LoRA experts (shared expert + top-2 of the held ones) on q and v, "
    "router statistics and the RSEA assignment (a host-side LP) every round",
}


# --------------------------------------------------------------------------------------------
# Section workers (each in its own process; rows appended to a JSON-lines file as they finish).
# --------------------------------------------------------------------------------------------


def contender_rows(c: dict) -> list[dict]:
    """The contenders of section 1: chunked at each chunk size, vmap (remat, chunked head), the
    big-batch step (as the clients' memory settings and, last, without them) and the loop."""
    mem = {"remat": True, "ce_chunk": c["ce_chunk"]}
    rows = [{"strategy": "chunked", "chunk_size": c["chunk_sizes"][0]}]
    rows += [{"strategy": "big_batch", **mem}, {"strategy": "python_loop"}]
    rows += [{"strategy": "vmap", **mem}]
    rows += [{"strategy": "chunked", "chunk_size": k} for k in c["chunk_sizes"][1:]]
    return [*rows, {"strategy": "big_batch"}]


def _label(row: dict) -> str:
    label = row["strategy"] + (f"{row['chunk_size']}" if row.get("chunk_size") else "")
    return label + ("+remat" if row.get("remat") else "")


def run_contenders(
    c: dict, emit, n: int | None = None, steps: int | None = None, trace: Path | None = None
) -> None:
    """Section 1 (and, with `n` and `steps`, one row of section 2): each contender compiled,
    warmed up and timed in this process; a failure (e.g. out of memory) is recorded as its row.
    `trace`: a folder that gets `trace_<label>.tar.gz`, a `jax.profiler` trace of one call of the
    first contender (where the time goes, for a missed goal)."""
    n = n or c["num_clients"]
    rows = (
        contender_rows(c)
        if steps is None
        else [{"strategy": "chunked", "chunk_size": c["scaling_chunk"]}]
    )
    base = {**c, "steps": steps or c["steps"], "chunk_size": 1, "remat": False, "ce_chunk": None}
    envs = {}  # engine.setup per memory setting (the model is built once for each)
    for spec in rows:
        cfg = {**base, **spec}
        label = _label(spec)
        try:
            key = (cfg["remat"], cfg["ce_chunk"])
            if key not in envs:
                envs[key] = engine.setup(cfg, n)
            traced = trace is not None and spec is rows[0]
            with tempfile.TemporaryDirectory() as tmp:
                row = engine.run_contender(
                    spec["strategy"], n, cfg, envs[key], trace_dir=Path(tmp) if traced else None
                )
                if traced:
                    archive = shutil.make_archive(str(trace / f"trace_{label}"), "gztar", tmp)
                    row["trace"] = Path(archive).name
                    row["trace_top"] = trace_summary(Path(tmp))
        except Exception as err:  # noqa: BLE001 - an OOM or compile failure is a result
            emit({"label": label, "num_clients": n, **spec, "error": _one_line(err)})
            continue
        emit({**row, "label": label, **spec})


def trace_summary(folder: Path, top: int = 15) -> list[dict]:
    """Where the time of a traced call goes: the `top` event names by inclusive milliseconds per
    trace process (`/device:GPU:0` streams, the host), from the profiler's Chrome-trace JSON;
    Python frames (`$file:line`) left out."""
    import gzip

    totals, names = {}, {}
    for path in folder.glob("plugins/profile/*/*.trace.json.gz"):
        events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
        for e in events:
            if e.get("ph") == "M" and e.get("name") == "process_name":
                names[e["pid"]] = e["args"]["name"]
        for e in events:
            if "dur" in e and not e.get("name", "$").startswith("$"):
                key = (names.get(e["pid"], str(e["pid"])), e["name"])
                totals[key] = totals.get(key, 0.0) + e["dur"] / 1e3
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [{"process": proc, "name": name, "ms": ms} for (proc, name), ms in ranked]


def run_scaling(c: dict, emit) -> None:
    for n in c["scaling_clients"]:
        run_contenders(c, emit, n=n, steps=1)


def method_problem(c: dict, n: int):
    """The benchmark model (engine.setup's) as a `Problem` of N clients with `val` and `aux`
    evaluation sets (`eval_windows` windows each), `chunked` clients, K local steps."""
    import numpy as np
    from flax import nnx

    from fedjax_lora.algorithms import Problem
    from fedjax_lora.data.streams import stack_streams
    from fedjax_lora.engine import LocalTraining, OptimizerConfig, Strategy

    env = engine.setup(c, n)
    model = nnx.merge(env["graphdef"], env["template"], env["base"])
    rng = np.random.default_rng(2)
    streams = np.asarray(env["tokens"])
    w, t = c["eval_windows"], c["seq_len"]
    windows = lambda: rng.integers(0, c["vocab_size"], (n, w, t + 1)).astype(np.int32)
    valid = np.ones((n, w), bool)
    return Problem.create(
        model,
        stack_streams(list(streams)),
        {"val": (windows(), valid)},
        training=LocalTraining(
            steps=c["method_steps"], batch_size=c["batch_size"], seq_len=t, dropout=False
        ),
        optimizer=OptimizerConfig(name="adamw", lr=1e-3),
        strategy=Strategy(kind="chunked", chunk_size=c["scaling_chunk"]),
        eval_batch_size=c["batch_size"],
        side={"aux": (windows(), valid)},  # FedAMoLE's RSEA reads the auxiliary windows
    )


def method_options(name: str, c: dict, n: int) -> dict:
    """Each family at the plain LoRA's place and size where it has one: HetLoRA and FlexLoRA with
    ranks 2, 4, 8 (cycled over the clients, zero-padded to 8) on q and v; FedAMoLE on q and v
    with a pool that RSEA can assign to N clients; CoMiGS 1G1S (one generalist, one specialist),
    its router on fixed validation windows (the benchmark's windows do not cover the stream)."""
    from fedjax_lora.amole import AMoLEConfig
    from fedjax_lora.lora import LoRAConfig

    if name in ("hetlora", "flexlora"):
        ranks = [(2, 4, 8)[i % 3] for i in range(n)]
        return {"ranks": ranks, "ranked": LoRAConfig(targets=engine.TARGETS, rank=c["rank"])}
    if name == "fedamole":
        a = c["amole"]
        return {
            "clients_per_expert": a["clients_per_expert"],
            "min_experts": a["min_experts"],
            "max_experts": a["max_experts"],
            "amole": AMoLEConfig(
                targets=engine.TARGETS, num_experts=a["num_experts"], rank=c["rank"], dropout=0.0
            ),
        }
    if name == "comigs":
        return {"router_batches": "windows"}
    return {}


def run_methods(c: dict, emit) -> None:
    """Section 3: per method, `init`, a first round (compiles) and a timed second round."""
    import jax

    from fedjax_lora.algorithms.methods import get_method

    n = c["method_clients"]
    problem = method_problem(c, n)
    for name in METHODS:
        try:
            algo = get_method(name)(problem, **method_options(name, c, n))
            sim = algo.init(jax.random.key(0))
            t0 = time.perf_counter()
            sim, metrics = algo.round(sim)
            jax.block_until_ready((sim, metrics))
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            sim, metrics = algo.round(sim)
            jax.block_until_ready((sim, metrics))
            seconds = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - recorded as the method's row
            emit({"method": name, "num_clients": n, "error": _one_line(err)})
            continue
        emit(
            {
                "method": name,
                "num_clients": n,
                "round_s": seconds,
                "first_round_s": first,
                "client_steps_per_s": n * c["method_steps"] / seconds,
                "device_peak_gb": engine._device_peak_gb(),
                "extra_work": EXTRA_WORK.get(name),
            }
        )


def run_reference(c: dict, emit, harness: Path | None, ref_dir: Path | None) -> None:
    """Section 4: the parity harness's speed script (reference loop vs our round) on the same
    sizes, when the harness and the reference tree were carried; else one row saying why not."""
    missing = [
        f"{what} {path}"
        for what, path in (("harness", harness), ("reference tree", ref_dir))
        if path is None or not path.exists()
    ]
    if missing:
        emit({"skipped": f"not carried: {', '.join(missing)} (see README, GPU section)"})
        return
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "reference_speed.json"
    cmd = [
        sys.executable,
        str(harness),
        "--ref-dir",
        str(ref_dir),
        "--arms",
        "ref",
        "jax-vmap",
        "--reps",
        "1",
        "--json",
        str(out),
        *(
            f"--layers {c['n_layers']} --d-model {c['d_model']} --heads {c['n_heads']} "
            f"--vocab {c['vocab_size']} --seq-len {c['seq_len']} --batch-size {c['batch_size']} "
            f"--rank {c['rank']} --clients {c['num_clients']} --steps {c['steps']}"
        ).split(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        emit({"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])})
        return
    summary = json.loads(out.read_text())["summary"]
    # the harness's speed-up: the reference's seconds per round over ours, per interleaved rep
    emit({"summary": summary, "speedup_vs_reference": summary.get("speedup_jax-vmap")})


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def worker(section: str, c: dict, rows_path: Path, args: dict) -> None:
    """Runs one section, appending each finished row to `rows_path` (JSON lines)."""
    import jax

    jax.devices()

    def emit(row: dict) -> None:
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  {section}: {_summary_line(row)}", flush=True)

    if section == "contenders":
        run_contenders(c, emit, trace=Path(args["trace_dir"]) if args["trace_dir"] else None)
    elif section == "scaling":
        run_scaling(c, emit)
    elif section == "methods":
        run_methods(c, emit)
    else:
        paths = [Path(p) if p else None for p in (args["ref_harness"], args["ref_dir"])]
        run_reference(c, emit, *paths)


def _summary_line(row: dict) -> str:
    if "error" in row or "skipped" in row:
        return f"{row.get('label') or row.get('method', '')} {row.get('error') or row['skipped']}"
    if "method" in row:
        return f"{row['method']:<9} {row['round_s']:.3f} s/round"
    if "summary" in row:
        return f"speed-up vs the reference: {row['speedup_vs_reference']}"
    return (
        f"N={row['num_clients']:<5} {row['label']:<16} {row['client_steps_per_s']:9.2f} "
        f"client-steps/s  compile {row['compile_s']:.1f} s"
    )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_section(section: str, c: dict, budget: float, workdir: Path, args: dict) -> dict:
    """The section in a fresh process, killed after `budget` seconds; the rows it finished."""
    rows_path = workdir / f"{section}.jsonl"
    rows_path.unlink(missing_ok=True)
    spec = {"section": section, "config": c, "rows": str(rows_path), "args": args}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = engine._worker_env(None, keep_cache=args["smoke"])
    if args["smoke"]:  # tiny programs: XLA's compile time dominates, skip its expensive passes
        env["XLA_FLAGS"] = SMOKE_XLA_FLAGS
    t0 = time.perf_counter()
    status, tail = "complete", ""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=budget)
        if proc.returncode != 0:
            status, tail = "failed", " | ".join(err.strip().splitlines()[-3:])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and any process it started
        proc.communicate()
        status = "budget spent"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
    return {
        "status": status,
        "budget_s": budget,
        "wall_s": time.perf_counter() - t0,
        "rows_finished": len(rows),
        "error": tail or None,
        "rows": rows,
    }


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "count": len(jax.devices())}


def device_slug(kind: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `h100_80gb_hbm3` (the file name's device part)."""
    slug = re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")
    return slug.removeprefix("nvidia_") or "device"


def peak_tflops(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def _n(row: dict) -> int:
    return row["num_clients"]


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r and "skipped" not in r]


def _goal(goal: str, target: float, measured: float | None, higher_is_better: bool = True):
    met = (
        None
        if measured is None
        else (measured >= target if higher_is_better else measured <= target)
    )
    return {"goal": goal, "target": target, "measured": measured, "met": met}


def evaluate_goals(doc: dict) -> list[dict]:
    """The issue's goals against the measured rows; `met` is None where a row is missing."""
    rows = _ok(doc["sections"].get("contenders", {}).get("rows", []))
    engine_rows = [r for r in rows if r["strategy"] in ("vmap", "chunked")]
    best = max(engine_rows, key=lambda r: r["client_steps_per_s"], default=None)
    rate = lambda kind: max(
        (r["client_steps_per_s"] for r in rows if r["strategy"] == kind), default=None
    )
    ratio = lambda a, b: None if a is None or not b else a / b
    best_rate = best and best["client_steps_per_s"]
    at = f"(N={doc['config']['num_clients']})"
    goals = [
        _goal(f"vmap/chunked ÷ big-batch step {at}", 0.8, ratio(best_rate, rate("big_batch"))),
        _goal(f"vmap/chunked ÷ Python loop {at}", 10.0, ratio(best_rate, rate("python_loop"))),
        _goal(f"client-steps/s {at}", 200.0, best_rate),
        _goal(f"tokens/s {at}", 0.4e6, best and best["tokens_per_s"]),
        _goal(f"MFU {at}", 0.25, best and best["mfu"]),
    ]
    scaling = _ok(doc["sections"].get("scaling", {}).get("rows", []))
    by_n = {r["num_clients"]: r for r in scaling}
    largest = max(doc["config"]["scaling_clients"])
    goals.append(_goal(f"{largest} clients fit (1 = ran)", 1.0, 1.0 if largest in by_n else 0.0))
    smallest = min(doc["config"]["scaling_clients"])
    temp = lambda n: (by_n.get(n) or {}).get("xla_memory_gb") or {}
    grow = ratio(temp(largest).get("temp"), temp(smallest).get("temp"))
    goals.append(
        _goal(f"activation (XLA temp) memory at N={largest} ÷ N={smallest}", 1.25, grow, False)
    )
    methods = {r["method"]: r for r in _ok(doc["sections"].get("methods", {}).get("rows", []))}
    fedavg = methods.get("fedavg", {}).get("round_s")
    for name in METHODS[1:]:
        cost = ratio(methods.get(name, {}).get("round_s"), fedavg)
        goal = _goal(f"{name} round ÷ fedavg round", 2.0, cost, False)
        if EXTRA_WORK.get(name):
            goal["more_work_by_definition"] = EXTRA_WORK[name]
        goals.append(goal)
    return goals


def markdown(doc: dict) -> str:
    dev = doc["device"]
    lines = [
        f"# Engine on {dev['device_kind']} ({doc['config']['preset']})",
        "",
        "| contender | N | client-steps/s | tokens/s | MFU | compile s | XLA temp GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for section in ("contenders", "scaling"):
        for r in doc["sections"].get(section, {}).get("rows", []):
            if "error" in r:
                lines.append(f"| {r['label']} | {r['num_clients']} | {r['error'][:80]} | | | | |")
                continue
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
            temp = (r["xla_memory_gb"] or {}).get("temp")
            lines.append(
                f"| {r['label']} | {r['num_clients']} | {r['client_steps_per_s']:.1f} | "
                f"{r['tokens_per_s']:.0f} | {mfu} | {r['compile_s']:.1f} | "
                f"{'-' if temp is None else f'{temp:.2f}'} |"
            )
    lines += ["", "| method | s/round | first round s (compile) |", "|---|---|---|"]
    for r in doc["sections"].get("methods", {}).get("rows", []):
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error'][:80]} | |")
        else:
            lines.append(f"| {r['method']} | {r['round_s']:.3f} | {r['first_round_s']:.1f} |")
    lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
    for g in doc["goals"]:
        m = "-" if g["measured"] is None else f"{g['measured']:.3g}"
        met = {True: "met", False: "**not met**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['target']:g} | {m} | {met} |")
    traced = [r for r in doc["sections"].get("contenders", {}).get("rows", []) if "trace" in r]
    for r in traced:
        lines += ["", f"Traced call of `{r['label']}` (`{r['trace']}`), inclusive ms:", ""]
        lines += ["| process | event | ms |", "|---|---|---|"]
        lines += [
            f"| {t['process']} | `{t['name'][:60]}` | {t['ms']:.1f} |" for t in r["trace_top"]
        ]
    lines += ["", "| section | status | rows | wall s / budget s |", "|---|---|---|---|"]
    for name, s in doc["sections"].items():
        lines.append(
            f"| {name} | {s['status']} | {s['rows_finished']} | "
            f"{s['wall_s']:.0f} / {s['budget_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Client-steps/s per contender, XLA memory against N, seconds per round per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rows = _ok(doc["sections"].get("contenders", {}).get("rows", []))
    axes[0].barh([r["label"] for r in rows], [r["client_steps_per_s"] for r in rows])
    axes[0].set(xlabel="client-steps / s", title=f"N={doc['config']['num_clients']}")
    rows = sorted(_ok(doc["sections"].get("scaling", {}).get("rows", [])), key=_n)
    ns = [r["num_clients"] for r in rows]
    for part in ("argument", "temp"):
        axes[1].plot(ns, [(r["xla_memory_gb"] or {}).get(part, 0) for r in rows], "o-", label=part)
    axes[1].set(xscale="log", xlabel="clients N", ylabel="GB (XLA plan)", title="chunked memory")
    axes[1].legend()
    rows = _ok(doc["sections"].get("methods", {}).get("rows", []))
    axes[2].bar([r["method"] for r in rows], [r["round_s"] for r in rows])
    axes[2].set(ylabel="seconds / round", title="method families")
    axes[2].tick_params(axis="x", rotation=30)
    fig.suptitle(doc["device"]["device_kind"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any backend (the test)")
    p.add_argument("--json", type=Path, help="default: results/engine_<device>.json")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument(
        "--budgets", type=json.loads, help="seconds per section, e.g. '{\"methods\": 90}'"
    )
    p.add_argument("--peak-tflops", type=float, help="default: the device kind's dense bf16 peak")
    p.add_argument("--ref-harness", default=".refcode/trust/speed.py", help="section 4's script")
    p.add_argument("--ref-dir", default=".refcode/personalized-collaborative-llms")
    p.add_argument(
        "--trace-dir", type=Path, help="write a profiler trace of the first contender's call here"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        worker(spec["section"], spec["config"], Path(spec["rows"]), spec["args"])
        return 0

    import jax

    c = {**(SMOKE if args.smoke else GPU), "preset": "smoke" if args.smoke else "gpu"}
    c["budgets"] = {**c["budgets"], **(args.budgets or {})}
    device = device_info()
    c["peak_tflops"] = args.peak_tflops or peak_tflops(device["device_kind"])
    print(f"device: {device} (jax {jax.__version__}); peak {c['peak_tflops']} TFLOP/s", flush=True)
    slug = device_slug(device["device_kind"]) + ("_smoke" if args.smoke else "")
    if args.json is None and device["platform"] == "cpu":  # engine_cpu.json is engine.py's
        p.error("no accelerator: give --json for a CPU run (e.g. --smoke --json /tmp/gpu.json)")
    path = args.json or HERE / "results" / f"engine_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir = path.parent / f".{path.stem}_rows"
    workdir.mkdir(exist_ok=True)
    doc = {"device": device, "machine": engine.machine_info(), "config": c, "sections": {}}
    worker_args = {
        "smoke": args.smoke,
        "ref_harness": args.ref_harness,
        "ref_dir": args.ref_dir,
        "trace_dir": str(args.trace_dir.resolve()) if args.trace_dir else None,
    }
    for section in args.sections:
        budget = c["budgets"][section]
        print(f"[{section}] budget {budget} s", flush=True)
        doc["sections"][section] = run_section(section, c, budget, workdir, worker_args)
        s = doc["sections"][section]
        print(
            f"[{section}] {s['status']}: {s['rows_finished']} rows in {s['wall_s']:.0f} s"
            + (f" ({s['error']})" if s["error"] else ""),
            flush=True,
        )
        doc["goals"] = evaluate_goals(doc)
        path.write_text(json.dumps(doc, indent=2) + "\n")
    for name in (workdir / f"{s}.jsonl" for s in SECTIONS):
        name.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        workdir.rmdir()
    doc["goals"] = evaluate_goals(doc)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(doc))
    plot(doc, path.with_suffix(".png"))
    print("\n" + markdown(doc))
    print(f"wrote {path} and its .md and .png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
