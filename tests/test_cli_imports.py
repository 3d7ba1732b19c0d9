"""The CLI before any compute: configs checked without JAX, and `--import` of a user's module
that registers a method (the CLI is another process than the one that called `register`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.d_model=32",
    "model.d_ff=64",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.vocab_size=64",
    "model.max_positions=32",
    "data.tokens_per_client=600",
    "training.steps=2",
    "training.batch_size=4",
    "training.seq_len=16",
    "eval.max_windows=4",
    "eval.batch_size=4",
]


def _python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd)])}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True
    )


CLI_WITHOUT_JAX = """
import sys
from fedjax_lora.cli import main
code = main(sys.argv[1:])
print("jax imported:", "jax" in sys.modules, "exit:", code)
"""


def test_config_errors_answer_before_jax_is_imported(tmp_path):
    """A wrong key in a YAML file, an override or a grid's cell fails with its one-line message
    while JAX is still unimported (so the answer takes a fraction of a second)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 2\ntraining: {stepz: 3}\n")
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "methods: [local]\nseeds: [0]\nbase: {}\ncells: [{name: a, set: {data: {bogus: 1}}}]\n"
    )
    cases = [
        (["run", str(bad)], "training.stepz"),
        (["demo", "--set", "optimizer.lr=-1"], "learning rate must be positive"),
        (["sweep", str(bad)], "training.stepz"),
        (["grid", str(grid), "--out", str(tmp_path / "g")], "data.bogus"),
    ]
    for argv, message in cases:
        result = _python(CLI_WITHOUT_JAX, tmp_path, *argv)
        assert "jax imported: False exit: 2" in result.stdout, (argv, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_config_module_imports_without_jax(tmp_path):
    code = (
        "import sys, fedjax_lora.config; print(sorted({'jax', 'optax', 'flax'} & set(sys.modules)))"
    )
    assert _python(code, tmp_path).stdout.strip() == "[]"


USER_MODULE = """
'''A user's method: every client averages with all others (FedAvg of separately drawn adapters).'''
from fedjax_lora.aggregation import fedavg_aggregator
from fedjax_lora.algorithms import federated, register


def my_average(problem, options):
    '''Separately initialised clients, averaged every round.'''
    del options  # registered without options
    return federated("my-average", problem, fedavg_aggregator(), shared_init=False)


register("my-average", my_average)
"""


def test_import_flag_runs_a_method_registered_in_a_user_module(tmp_path):
    (tmp_path / "my_methods.py").write_text(textwrap.dedent(USER_MODULE))
    run = "import sys; from fedjax_lora.cli import main; sys.exit(main(sys.argv[1:]))"
    listed = _python(run, tmp_path, "methods", "--import", "my_methods")
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[0] == "my-average" for line in listed.stdout.splitlines())
    out = tmp_path / "run"
    argv = ["demo", "--import", "my_methods", "--methods", "my-average", "--rounds", "1"]
    argv += ["--out", str(out), "--no-progress", "--set", *TINY]
    result = _python(run, tmp_path, *argv)
    assert result.returncode == 0, result.stderr
    assert "my-average" in json.loads((out / "summary.json").read_text())
    assert json.loads((out / "config.json").read_text())["imports"] == ["my_methods"]
    # A module that cannot be imported is named in a one-line error.
    missing = _python(run, tmp_path, "methods", "--import", "no_such_module")
    assert missing.returncode == 2 and "no_such_module" in missing.stderr


def test_compilation_cache_directory_and_its_switch():
    from fedjax_lora.cli import compilation_cache_dir

    home = {"XDG_CACHE_HOME": "/c"}
    assert compilation_cache_dir(home) == Path("/c/fedjax_lora/jax")
    assert compilation_cache_dir({**home, "FEDJAX_LORA_COMPILATION_CACHE": "/x"}) == Path("/x")
    assert compilation_cache_dir({**home, "FEDJAX_LORA_COMPILATION_CACHE": "0"}) is None
    assert compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/j"}) is None  # JAX's own
