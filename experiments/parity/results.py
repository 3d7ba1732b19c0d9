"""The results format shared by every parity harness.

Each script of a paper's harness records its comparisons in a `Results` and saves them as
`OUT_DIR/parts/<part>.json`; `python results.py OUT_DIR` merges the parts into
`OUT_DIR/results.json`:

    {"checks": [{"name": str, "max_abs_diff": float | null, "tolerance": float, "ok": bool}, ...],
     "info":   [{"name": str, "value": float | null, "note": str}, ...],
     "speed":  {...}}

A check passes iff `max_abs_diff <= tolerance` (a non-finite difference is stored as null and
fails). A check whose fedjax_lora switch is not there
yet carries `"missing": "<what>"`, `max_abs_diff: null` and `ok: false`, so it never passes
silently. `info` rows are documented differences from the authors' code (by design, reference
bugs this project does not reproduce by default) and diagnostics; they are not checks.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sys
from pathlib import Path


class Results:
    """Check, info and speed rows of one harness script (`part`)."""

    def __init__(self, part: str):
        self.part = part
        self.checks: list[dict] = []
        self.info_rows: list[dict] = []
        self.speed: dict = {}

    def check(self, name: str, diff: float, tolerance: float, note: str = "") -> bool:
        diff = float(diff)
        ok = math.isfinite(diff) and diff <= tolerance
        row = {
            "name": name,
            "max_abs_diff": diff if math.isfinite(diff) else None,  # strict JSON: no NaN
            "tolerance": float(tolerance),
            "ok": ok,
        }
        if note:
            row["note"] = note
        self.checks.append(row)
        print(f"{'ok' if ok else 'FAIL':4s} {diff:10.3e} (tol {tolerance:.1e})  {name}", flush=True)
        return ok

    def missing(self, name: str, what: str, tolerance: float = 0.0) -> None:
        """A check that cannot run because fedjax_lora lacks the switch `what`."""
        self.checks.append(
            {
                "name": name,
                "max_abs_diff": None,
                "tolerance": float(tolerance),
                "ok": False,
                "missing": what,
            }
        )
        print(f"MISSING {name}: {what}", flush=True)

    def info(self, name: str, value: float | None, note: str = "") -> None:
        value = None if value is None or not math.isfinite(value) else float(value)
        self.info_rows.append({"name": name, "value": value, "note": note})
        shown = "-" if value is None else f"{value:.3e}"
        print(f"info {shown:>10s}  {name}  {note}", flush=True)

    def save(self, out_dir: str | Path | None = None) -> Path:
        out = Path(out_dir or os.environ.get("OUT_DIR", "parity_out")) / "parts"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.part}.json"
        body = {"checks": self.checks, "info": self.info_rows, "speed": self.speed}
        path.write_text(json.dumps(body, indent=1, default=_jsonable, allow_nan=False))
        return path


def has_param(fn, name: str) -> bool:
    """Whether the installed fedjax_lora's `fn` takes the keyword `name` (a switch the harness
    needs; without it the check is reported as missing)."""
    return name in inspect.signature(fn).parameters


def has_field(cls, name: str) -> bool:
    """Whether the dataclass `cls` of the installed fedjax_lora has the field `name`."""
    return name in {f.name for f in dataclasses.fields(cls)}


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def collect(out_dir: str | Path) -> dict:
    """Merges `OUT_DIR/parts/*.json` into `OUT_DIR/results.json` (check names prefixed by the
    part) and returns it."""
    out = Path(out_dir)
    merged: dict = {"checks": [], "info": [], "speed": {}}
    for path in sorted((out / "parts").glob("*.json")):
        part = json.loads(path.read_text())
        for key in ("checks", "info"):
            for row in part[key]:
                merged[key].append({**row, "name": f"{path.stem}: {row['name']}"})
        if part["speed"]:
            merged["speed"][path.stem] = part["speed"]
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    return merged


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python results.py OUT_DIR", file=sys.stderr)
        return 2
    merged = collect(argv[0])
    bad = [c for c in merged["checks"] if not c["ok"]]
    for c in bad:
        if "missing" in c:
            why = f"missing: {c['missing']}"
        else:
            why = "not finite" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.3e}"
        print(f"FAILED {c['name']} ({why}, tolerance {c['tolerance']:.1e})")
    print(
        f"{len(merged['checks'])} checks, {len(bad)} failed or missing; "
        f"{len(merged['info'])} info rows -> {Path(argv[0]) / 'results.json'}"
    )
    return 1 if bad or not merged["checks"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
