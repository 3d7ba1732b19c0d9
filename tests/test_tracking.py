"""Trackers: metrics.jsonl and TensorBoard event files (read back with a hand-written TFRecord
parser), and the W&B error when the package is missing."""

from __future__ import annotations

import builtins
import json
import struct

import pytest
from tensorboardX.proto import event_pb2

from fedjax_lora.tracking import open_trackers, scalars

RECORD = {
    "method": "fedavg",
    "round": 3,
    "seconds": 0.5,
    "val_ppl": [10.0, 20.0],
    "val_mean_ppl": 15.0,
    "mixing": [[0.5, 0.5], [0.5, 0.5]],
}


def _read_events(path):
    data = path.read_bytes()
    events, i = [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i : i + 8])
        payload = data[i + 12 : i + 12 + length]
        i += 12 + length + 4
        events.append(event_pb2.Event.FromString(payload))
    return events


def test_scalars_flatten_means_and_per_client_values():
    assert scalars(RECORD) == {
        "fedavg/seconds": 0.5,
        "fedavg/val_ppl/client_0": 10.0,
        "fedavg/val_ppl/client_1": 20.0,
        "fedavg/val_mean_ppl": 15.0,
    }


def test_jsonl_and_tensorboard_receive_every_record(tmp_path):
    trackers = open_trackers(tmp_path, tensorboard=True, wandb=False, project="p", config={})
    trackers.log(RECORD)
    trackers.log({**RECORD, "round": 4, "val_mean_ppl": 12.0})
    trackers.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [3, 4]
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    found = {
        (v.tag, e.step): v.simple_value for e in _read_events(event_file) for v in e.summary.value
    }
    assert found[("fedavg/val_mean_ppl", 3)] == 15.0
    assert found[("fedavg/val_mean_ppl", 4)] == 12.0
    assert found[("fedavg/val_ppl/client_1", 3)] == 20.0


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ValueError, match="pip install wandb"):
        open_trackers(tmp_path, tensorboard=False, wandb=True, project="p", config={})
