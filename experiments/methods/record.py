"""Every registered method's numbers on one fixed tiny config, for refactors: run before and
after a change and compare the JSON files (`--compare OLD.json NEW.json`).

    python experiments/methods/record.py --out runs/methods_before.json
    python experiments/methods/record.py --out runs/methods_after.json
    python experiments/methods/record.py --compare runs/methods_before.json runs/methods_after.json

The config: 4 clients in 2 synthetic groups on the tiny random GPT-2, 2 rounds of 4 steps,
`data.aux_fraction=0.1` (the auxiliary split FedAMoLE and FDLoRA read), FedAMoLE with a pool of 4
experts (`EXTRA`). Each method runs in its own
`train_and_evaluate` call; a method that fails records its error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

OVERRIDES = [
    "data.num_groups=2",
    "data.clients_per_group=2",
    "data.tokens_per_client=3000",
    "data.aux_fraction=0.1",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.max_positions=64",
    "training.steps=4",
    "training.batch_size=4",
    "training.seq_len=32",
    "eval.max_windows=8",
    "eval.batch_size=4",
    "rounds=2",
    "tracking.progress=false",
    "tracking.tensorboard=false",
]


# FedAMoLE's default pool (30 experts, 2 holders each) needs more than 4 clients.
_AMOLE = [
    "amole={targets: [c_attn.q, c_attn.v], num_experts: 4, rank: 4}",
    "clients_per_expert=2",
    "min_experts=2",
    "max_experts=4",
]
EXTRA = {m: [f"method_options.{m}.{o}" for o in _AMOLE] for m in ("fedamole", "fedamole-r")}


def record(methods: list[str] | None) -> dict:
    from fedjax_lora import config as config_lib
    from fedjax_lora.algorithms import METHODS
    from fedjax_lora.experiment import train_and_evaluate

    out = {}
    for name in methods or sorted(METHODS):
        config = config_lib.load(None, [*OVERRIDES, *EXTRA.get(name, []), f"methods=[{name}]"])
        with tempfile.TemporaryDirectory() as tmp:
            try:
                summary = train_and_evaluate(config, tmp, progress=False)[name]
            except Exception as e:  # recorded, so a refactor can show it fixed or kept it
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{name}: {out[name]['error']}", file=sys.stderr)
                continue
        out[name] = {k: summary[k] for k in ("val_ppl", "test_ppl", "val_mean_ppl")}
        print(f"{name}: val {summary['val_mean_ppl']:.6f}", file=sys.stderr)
    return out


def compare(old: dict, new: dict, rtol: float = 1e-5) -> list[str]:
    """The methods whose numbers differ by more than `rtol` (or appeared, vanished, or changed
    between error and result)."""
    diffs = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None or b is None or ("error" in a) != ("error" in b):
            diffs.append(f"{name}: {a} -> {b}")
            continue
        if "error" in a:
            continue
        for key in ("val_ppl", "test_ppl"):
            for x, y in zip(a[key], b[key], strict=True):
                if not math.isclose(x, y, rel_tol=rtol):
                    diffs.append(f"{name}.{key}: {a[key]} -> {b[key]}")
                    break
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--methods", nargs="*")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    args = parser.parse_args()
    if args.compare:
        old, new = (json.loads(Path(p).read_text()) for p in args.compare)
        diffs = compare(old, new)
        print("\n".join(diffs) or f"all {len(old)} methods unchanged")
        return
    result = record(args.methods)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
