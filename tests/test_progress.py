"""Progress bars: shown only on a terminal (or in a notebook) and when `tracking.progress` is on;
they never change what a run computes."""

from __future__ import annotations

import io
import json
import re

import pytest

from fedjax_lora import config as config_lib
from fedjax_lora.experiment import train_and_evaluate
from fedjax_lora.tracking import progress_bar
from tests.test_cli import TINY


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("tty", "enabled", "shown"), [(True, True, True), (True, False, False), (False, True, False)]
)
def test_progress_bar_only_on_a_terminal_and_when_enabled(monkeypatch, tty, enabled, shown):
    stream = FakeTerminal() if tty else io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    items = list(progress_bar(range(5), enabled=enabled, desc="rounds"))
    assert items == [0, 1, 2, 3, 4]
    assert ("rounds" in stream.getvalue()) == shown


def test_tracking_progress_is_a_config_field():
    assert config_lib.ExperimentConfig().tracking.progress is True
    assert config_lib.load(None, ["tracking.progress=false"]).tracking.progress is False


def _run(out, progress: bool) -> list[dict]:
    config = config_lib.load(
        None,
        [
            *TINY,
            "data.num_groups=2",
            "data.clients_per_group=2",
            "rounds=2",
            "methods=[fedavg]",
            f"tracking.progress={str(progress).lower()}",
        ],
    )
    train_and_evaluate(config, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_bars_draw_on_a_terminal_and_leave_results_unchanged(tmp_path, monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with_bars = _run(tmp_path / "on", progress=True)
    shown = terminal.getvalue()
    assert "fedavg" in shown and "round" in shown
    # every round's evaluation: 4 clients × the val and test sets, counted inside the program
    assert "fedavg evaluation" in shown and re.search(r"\| [1-8]/8 \[", shown)
    quiet = FakeTerminal()
    monkeypatch.setattr("sys.stderr", quiet)
    without = _run(tmp_path / "off", progress=False)
    assert quiet.getvalue() == ""
    assert with_bars == without


@pytest.mark.parametrize("kind", ["vmap", "map", "chunked"])
def test_ticking_counts_every_client_inside_jit(monkeypatch, kind):
    """`ticking` per-client functions advance the open evaluation bar once per client under
    every strategy, and leave the results unchanged."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fedjax_lora.engine.strategy import Strategy, map_clients
    from fedjax_lora.tracking import evaluation_progress, ticking

    monkeypatch.setattr("sys.stderr", FakeTerminal())
    fn = lambda x, w: {"sum": (x * w).sum()}
    strategy = Strategy(kind, chunk_size=2) if kind == "chunked" else Strategy(kind)
    run = jax.jit(lambda xs, w: map_clients(ticking(fn), strategy, (xs,), (w,)))
    xs = jnp.arange(15.0).reshape(5, 3)
    with evaluation_progress(5) as bar:
        out = jax.device_get(run(xs, jnp.float32(2.0)))
        assert bar.n == 5
    np.testing.assert_allclose(out["sum"], 2.0 * np.arange(15.0).reshape(5, 3).sum(1))
