"""`fedjax-lora methods`: every method with its options and their defaults."""

from __future__ import annotations

import dataclasses
import inspect

from fedjax_lora.algorithms.methods import METHODS
from fedjax_lora.cli import main
from fedjax_lora.options import method_options


def _leaves(value, key):
    """`(dotted key, default)` of every non-dataclass value under a default (reference walk)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = []
        for f in dataclasses.fields(value):
            out += _leaves(getattr(value, f.name), f"{key}.{f.name}")
        return out
    return [(key, value)]


def test_every_default_of_every_method_is_listed():
    for name, factory in METHODS.items():
        expected = []
        for p in list(inspect.signature(factory).parameters.values())[1:]:
            expected += _leaves(p.default, p.name)
        listed = [(o.key, o.default) for o in method_options(factory)]
        assert listed == [(k, repr(v)) for k, v in expected], name


def test_methods_command_prints_options_and_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    blocks = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            current = line.split()[0]
            blocks[current] = []
        else:
            blocks[current].append(line.strip())
    assert set(blocks) == set(METHODS)
    assert blocks["local"] == []
    assert "weighting: Literal['uniform', 'tokens'] = 'uniform'" in blocks["fedavg"]
    assert "options.sync_every: int = 5" in blocks["fdlora"]  # FedAMoLE reference's FDLoRA
    assert "options.sync_every: int = 1" in blocks["fdlora-comigs"]
    assert "schedule.router_split: Literal['val', 'train'] = 'train'" in blocks["comigs-tr"]
    assert "schedule.router_optimizer.lr: float = 0.002" in blocks["comigs"]
    assert "trust.top_k: int = 100" in blocks["pcl-pred"]
