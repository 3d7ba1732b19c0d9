"""The parity harnesses (experiments/parity/) need torch and the authors' code, so they are not
run here; this checks that every script compiles, that run.sh parses, and the results format."""

import importlib.util
import json
import py_compile
import shutil
import subprocess
from pathlib import Path

import pytest

PARITY = Path(__file__).resolve().parents[1] / "experiments" / "parity"


def test_every_harness_script_compiles(tmp_path):
    scripts = sorted(PARITY.rglob("*.py"))
    assert {p.parent.name for p in scripts} >= {"trust", "comigs", "fedamole"}
    for path in scripts:
        py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_run_sh_parses_and_rejects_bad_arguments(tmp_path):
    run_sh = PARITY / "run.sh"
    subprocess.run(["bash", "-n", str(run_sh)], check=True)
    bad = subprocess.run(
        ["bash", str(run_sh), "nope", str(tmp_path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "usage" in bad.stderr


def _results_module():
    spec = importlib.util.spec_from_file_location("parity_results", PARITY / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_json_format_and_missing_switches_fail(tmp_path):
    results = _results_module()
    a = results.Results("a")
    assert a.check("close", 1e-7, 1e-6)
    assert not a.check("far", 1e-3, 1e-6)
    assert not a.check("nan", float("nan"), 1.0)
    a.info("documented difference", 0.5, "by design")
    a.save(tmp_path)
    b = results.Results("b")
    b.missing("needs a switch", "some_flag (issue 14)")
    b.speed["round_s"] = [1.0, 2.0]
    b.save(tmp_path)

    assert results.main([str(tmp_path)]) == 1
    merged = json.loads((tmp_path / "results.json").read_text())
    assert set(merged) == {"checks", "info", "speed"}
    for check in merged["checks"]:
        assert set(check) >= {"name", "max_abs_diff", "tolerance", "ok"}
    by_name = {c["name"]: c for c in merged["checks"]}
    assert by_name["a: close"]["ok"] and not by_name["a: far"]["ok"]
    assert not by_name["a: nan"]["ok"]
    missing = by_name["b: needs a switch"]
    assert missing["ok"] is False and missing["max_abs_diff"] is None
    assert "some_flag" in missing["missing"]
    assert merged["speed"] == {"b": {"round_s": [1.0, 2.0]}}

    (tmp_path / "parts" / "b.json").unlink()
    (tmp_path / "parts" / "a.json").write_text(
        json.dumps({"checks": [by_name["a: close"] | {"name": "close"}], "info": [], "speed": {}})
    )
    assert results.main([str(tmp_path)]) == 0
