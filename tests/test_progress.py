"""Progress bars: shown only on a terminal (or in a notebook) and when `tracking.progress` is on;
they never change what a run computes."""

from __future__ import annotations

import io
import json

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
    assert "fedavg" in terminal.getvalue() and "round" in terminal.getvalue()
    quiet = FakeTerminal()
    monkeypatch.setattr("sys.stderr", quiet)
    without = _run(tmp_path / "off", progress=False)
    assert quiet.getvalue() == ""
    assert with_bars == without
