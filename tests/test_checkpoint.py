"""Checkpoints and exact resume: clean stop, fewer rounds then more, a corrupt newest checkpoint,
SIGKILL in the middle of a run, refusal to overwrite, and non-finite stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedjax_lora import config as config_lib
from fedjax_lora.checkpoint import STATE_LAYOUT, Checkpointer, CheckpointMismatchError
from fedjax_lora.experiment import train_and_evaluate
from tests.test_cli import TINY

BASE = [*TINY, "methods=[local,fedavg]", "checkpoint.every=1", "checkpoint.keep=2"]


def _config(*overrides):
    return config_lib.load(None, [*BASE, *overrides])


def _records(out: Path):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = train_and_evaluate(_config("rounds=4"), out, progress=False)
    return out, summary


def test_fewer_rounds_then_resume_is_identical(tmp_path, uninterrupted):
    full_out, full_summary = uninterrupted
    train_and_evaluate(_config("rounds=2"), tmp_path, progress=False)
    summary = train_and_evaluate(_config("rounds=4"), tmp_path, progress=False, resume=True)
    assert summary == full_summary
    assert _records(tmp_path) == _records(full_out)
    kept = sorted(
        int(p.name) for p in (tmp_path / "checkpoints" / "fedavg").iterdir() if p.name.isdigit()
    )
    assert kept == [3, 4]  # keep=2


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, uninterrupted, caplog):
    _, full_summary = uninterrupted
    train_and_evaluate(_config("rounds=3"), tmp_path, progress=False)
    newest = tmp_path / "checkpoints" / "local" / "3"
    for f in newest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    summary = train_and_evaluate(_config("rounds=4"), tmp_path, progress=False, resume=True)
    assert summary == full_summary
    assert "unreadable" in caplog.text


def test_a_fresh_run_never_overwrites_checkpoints(tmp_path):
    (tmp_path / "checkpoints" / "local" / "1").mkdir(parents=True)
    with pytest.raises(ValueError, match="--resume"):
        train_and_evaluate(_config("rounds=1"), tmp_path, progress=False)
    assert (tmp_path / "checkpoints" / "local" / "1").is_dir()


def test_resume_after_sigkill_mid_run_is_identical(tmp_path, uninterrupted):
    full_out, full_summary = uninterrupted
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text("rounds: 4\n")
    cmd = [
        sys.executable,
        "-m",
        "fedjax_lora.cli",
        "run",
        str(config_file),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--set",
        *BASE,
    ]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = tmp_path / "run" / "checkpoints" / "fedavg" / "1"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert main_cli([*cmd[3:], "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == full_summary
    assert _records(tmp_path / "run") == _records(full_out)


def main_cli(argv):
    from fedjax_lora.cli import main

    return main(argv)


def test_non_finite_training_stops_naming_method_client_and_round(tmp_path):
    cfg = _config("rounds=3", "methods=[local]", "optimizer.lr=1e30")
    with pytest.raises(FloatingPointError, match=r"method 'local'.*client\(s\).*round 1"):
        train_and_evaluate(cfg, tmp_path, progress=False)


def test_a_checkpoint_of_the_old_state_layout_is_refused_in_one_line(tmp_path):
    """A checkpoint written before `STATE_LAYOUT` 2 (no layout recorded) is refused naming the
    layouts and the fix, not restored leaf by leaf into the new layout."""
    state = {"params": np.ones((2, 3), np.float32), "step": np.zeros((2,), np.int32)}
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.save(1, state, [{"round": 1}])
    ckpt.close()
    written = [
        p for p in (tmp_path / "1").rglob("*") if p.is_file() and b"sha256" in p.read_bytes()
    ]
    assert len(written) == 1
    meta = json.loads(written[0].read_text())
    assert meta.pop("layout") == STATE_LAYOUT
    written[0].write_text(json.dumps(meta))
    ckpt = Checkpointer(tmp_path, keep=1)
    with pytest.raises(CheckpointMismatchError) as error:
        ckpt.restore_latest(state)
    ckpt.close()
    message = str(error.value)
    assert (
        "\n" not in message and "state layout 1" in message and f"layout {STATE_LAYOUT}" in message
    )
