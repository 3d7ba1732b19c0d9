"""The one method registry and its typed options: `fedjax-lora methods` lists every default,
`method_options.<method>` resolves onto the registered defaults, and bad or former keys fail in
one line naming the fix."""

from __future__ import annotations

import dataclasses

import pytest

from fedjax_lora import config as config_lib
from fedjax_lora.algorithms import METHODS, MethodSpec, NoOptions, get_method, register
from fedjax_lora.algorithms.comigs import BiLevel
from fedjax_lora.cli import main
from fedjax_lora.errors import ConfigError
from fedjax_lora.experiment import method_factory
from fedjax_lora.options import option_list


def _leaves(value, key):
    """`(dotted key, default)` of every non-dataclass value under a default (reference walk)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = []
        for f in dataclasses.fields(value):
            out += _leaves(getattr(value, f.name), f"{key}{f.name}.")
        return out
    return [(key[:-1], value)]


def test_every_method_has_one_frozen_options_dataclass_and_every_default_is_listed():
    for name, spec in METHODS.items():
        assert isinstance(spec, MethodSpec) and spec.name == name
        assert type(spec.options).__dataclass_params__.frozen, name
        listed = [(o.key, o.default) for o in option_list(spec.options)]
        assert listed == [(k, repr(v)) for k, v in _leaves(spec.options, "")], name


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
    assert "weighting: Literal['uniform', 'tokens'] = 'tokens'" in blocks["fedavg-tokens"]
    assert "sync_every: int = 5" in blocks["fdlora"]  # FedAMoLE reference's FDLoRA
    assert "sync_every: int = 1" in blocks["fdlora-comigs"]
    assert "schedule.router_split: Literal['val', 'train'] = 'train'" in blocks["comigs-tr"]
    assert "schedule.router_optimizer.lr: float = 0.002" in blocks["comigs"]
    assert "top_k: int = 100" in blocks["pcl-pred"]
    assert "round_decay: float | None = 0.99" in blocks["fedit-ft"]


def _options(name, *overrides):
    return method_factory(name, config_lib.load(None, list(overrides))).keywords["options"]


def test_method_options_resolve_onto_the_registered_defaults():
    # a nested key keeps the variant's other settings (comigs-tr: router on the training split)
    got = _options("comigs-tr", "method_options.comigs-tr.schedule.router_every=7")
    assert got.schedule == BiLevel(router_every=7, router_split="train")
    got = _options("fdlora-comigs", "method_options.fdlora-comigs.fusion_budget=4")
    assert (got.fusion_budget, got.fusion_set, got.sync_every) == (4, "val", 1)
    # the config's trust section is the trust-weighted methods' defaults, then their own keys
    got = _options("pcl-val", "trust.temperature=2.0", "method_options.pcl-val.top_k=5")
    assert (got.temperature, got.top_k) == (2.0, 5)
    assert _options("fedavg-tokens").weighting == "tokens"


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "method_options.fdlora.sync_evry=2",
            "method_options.fdlora has no option(s) ['sync_evry']; valid options: "
            "['local_rounds', 'sync_every',",
        ),
        ("method_options.fedit.round_decay=1.5", "invalid method_options.fedit: round_decay"),
        ("method_options.fedavg.evaluate=before", "'method_options.fedavg.evaluate' must be one"),
        (
            "method_options.fedamole.options={max_experts: 4}",
            "method_options.fedamole.options is gone: the options are flat now: write "
            "method_options.fedamole.<option> instead of method_options.fedamole.options.<option>",
        ),
        (
            "method_options.pcl-val.trust={top_k: 5}",
            "write method_options.pcl-val.<option> instead of method_options.pcl-val.trust.",
        ),
        (
            "method_options.fedprompt.config={num_virtual_tokens: 4}",
            "the prompt is set as method_options.fedprompt.prompt now",
        ),
        (
            "method_options.fedptuning.fine_tuned=true",
            "its own method now: run 'fedptuning-ft' instead",
        ),
    ],
)
def test_bad_and_former_option_keys_fail_in_one_line(override, message):
    config = config_lib.load(None, [override])
    with pytest.raises(ConfigError) as e:
        method_factory(override.split(".")[1], config)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_register_takes_one_frozen_options_dataclass():
    @dataclasses.dataclass
    class Mutable:
        x: int = 1

    with pytest.raises(TypeError, match="frozen dataclass"):
        register("mutable-options", lambda problem, options: None, Mutable())
    with pytest.raises(ValueError, match="already registered"):
        register("fedavg", lambda problem, options: None)
    assert "mutable-options" not in METHODS
    with pytest.raises(TypeError, match="takes FedAvgOptions options, got NoOptions"):
        get_method("fedavg")(None, NoOptions())
