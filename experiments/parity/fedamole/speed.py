"""Speed driver: the reference's real round vs fedjax_lora's fedamole round (map and vmap),
interleaved A B C A B C ... in long-lived worker processes, after warm-up.

  REF_PY=<reference venv python> JAX_PY=<fedjax_lora venv python> python speed.py [--reps 5]

Each worker builds its side once (speed_ref.py, speed_jax.py map, speed_jax.py vmap), runs
`--warmup` untimed rounds (JAX: compilation), then one timed round per "run" request; only one
worker computes at a time. Writes results/speed.json and results/speed.md: seconds per round,
client-steps/s (clients x local steps / round seconds), the per-rep ratio reference seconds /
JAX seconds (min / median / max), and each worker's peak RSS (ru_maxrss).
Results: results/speed_t<threads>_b<batch>.json|md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common
import numpy as np

sys.path.insert(0, str(common.HERE.parent))
from results import Results  # noqa: E402


def start(name, cmd, log, threads: int, batch: int):
    env = dict(os.environ, TQDM_DISABLE="1", SPEED_THREADS=str(threads), SPEED_BATCH=str(batch))
    if threads == 1:  # XLA's CPU client: one intra-op thread, like torch.set_num_threads(1)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
            "intra_op_parallelism_threads=1"
        ).strip()
    p = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=str(common.HERE),
        env=env,
    )
    line = p.stdout.readline()
    if not line:
        raise SystemExit(f"worker {name} died; see {log.name}")
    print(name, line.strip(), flush=True)
    return p


def run(p):
    p.stdin.write("run\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        raise SystemExit("worker died")
    return json.loads(line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="examples per local step (reference: 1)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of each worker (torch.set_num_threads; XLA single-"
        "threaded Eigen when 1). The reference's main.py sets 2; on a loaded 2-core "
        "machine torch's 2 OpenMP threads spin-wait badly (see README)",
    )
    ap.add_argument("--workers", nargs="+", default=["ref", "jax_map", "jax_vmap"])
    a = ap.parse_args()
    ref_py = os.environ.get("REF_PY", sys.executable)
    jax_py = os.environ.get("JAX_PY", sys.executable)
    cmds = {
        "ref": [ref_py, "speed_ref.py"],
        "jax_map": [jax_py, "speed_jax.py", "map"],
        "jax_vmap": [jax_py, "speed_jax.py", "vmap"],
    }
    tag = f"t{a.threads}_b{a.batch}"
    logs = {n: (common.results() / f"speed_{tag}_{n}.log").open("w") for n in a.workers}  # noqa: SIM115
    os.environ["SPEED_BATCH"] = str(a.batch)
    common.SPEED["batch"] = a.batch
    procs = {n: start(n, cmds[n], logs[n], a.threads, a.batch) for n in a.workers}
    warm = {n: [run(p)["seconds"] for _ in range(a.warmup)] for n, p in procs.items()}
    print("warm-up seconds", json.dumps(warm), flush=True)
    times = {n: [] for n in procs}
    rss = {}
    for rep in range(a.reps):
        for n, p in procs.items():
            out = run(p)
            times[n].append(out["seconds"])
            rss[n] = out["peak_rss_mb"]
        print("rep", rep, {n: round(t[-1], 3) for n, t in times.items()}, flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    for log in logs.values():
        log.close()
    s = common.SPEED
    steps = s["num_clients"] * s["steps"]
    summary = {
        "config": s,
        "model": common.SPEED_MODEL,
        "threads": a.threads,
        "warmup_seconds": warm,
        "workers": {},
    }
    for n, t in times.items():
        t = np.asarray(t)
        summary["workers"][n] = dict(
            seconds=t.tolist(),
            median_seconds=float(np.median(t)),
            client_steps_per_s=float(steps / np.median(t)),
            tokens_per_s=float(steps * s["batch"] * s["seq"] / np.median(t)),
            peak_rss_mb=rss[n],
        )
        if n != "ref" and "ref" in times:
            ratio = np.asarray(times["ref"]) / t
            summary["workers"][n]["speedup_vs_ref"] = dict(
                min=float(ratio.min()), median=float(np.median(ratio)), max=float(ratio.max())
            )
    common.save_json(f"speed_{tag}.json", summary)
    lines = [
        "| side | round s (median) | client-steps/s | tokens/s | ref s / this s (min/med/max) "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for n, w in summary["workers"].items():
        sp = w.get("speedup_vs_ref")
        sp = "" if sp is None else f"{sp['min']:.2f} / {sp['median']:.2f} / {sp['max']:.2f}"
        lines.append(
            f"| {n} | {w['median_seconds']:.3f} | {w['client_steps_per_s']:.1f} | "
            f"{w['tokens_per_s']:.0f} | {sp} | {w['peak_rss_mb']:.0f} |"
        )
    (common.results() / f"speed_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    R = Results("fedamole_speed")
    R.speed = summary
    print(f"written {R.save(common.out_dir())}")


if __name__ == "__main__":
    main()
