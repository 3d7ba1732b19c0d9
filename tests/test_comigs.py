"""CoMiGS end to end on a tiny GPT-2: bi-level training lowers the validation loss, the generalist
is identical across clients after aggregation while specialists and routers stay personal, router
and expert updates touch only their own parameters, and the mask policies select the right
tensors."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_lora.aggregation.masks import POLICIES, global_mask, path_names
from fedjax_lora.algorithms import get_method
from fedjax_lora.algorithms.comigs import BiLevel, CoMiGSOptions, comigs
from fedjax_lora.moe import Expert, ExpertMask, MoEConfig, Router
from tests.tiny import tiny_problem

MOE = MoEConfig(num_experts=3, top_k=2, rank=2)
FAST = BiLevel(router_every=2, router_steps=2)


def flat(params):
    return {
        ".".join(path_names(p)): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
    }


@functools.cache
def problem(optimizer=None):
    return tiny_problem(num_clients=3, steps=2, lr=2e-2, optimizer=optimizer, val_windows=64)


@pytest.fixture(scope="module")
def trained():
    algo = comigs(problem(), CoMiGSOptions(moe=MOE, expert_counts=(3, 2, 1), schedule=FAST))
    sim = algo.init(jax.random.key(0))
    start = flat(sim.clients.params)
    before = algo.evaluate(sim)["val"]["loss"]
    for _ in range(3):
        sim, metrics = algo.round(sim)
    return start, flat(nnx.merge_state(sim.clients.params, sim.clients.frozen)), before, metrics


def test_expert_masks_are_the_clients_frozen_state():
    """The masks are `ClientFrozen` state in `ClientState.frozen`, not among the adapters."""
    options = CoMiGSOptions(moe=MOE, expert_counts=(3, 2, 1), schedule=FAST)
    sim = comigs(problem(), options).init(jax.random.key(0))
    frozen = flat(sim.clients.frozen)
    assert frozen and all(name.endswith("expert_mask") for name in frozen)
    assert not any("expert_mask" in name for name in flat(sim.clients.params))
    for _, var in nnx.to_flat_state(sim.clients.frozen):
        assert isinstance(var, ExpertMask)


def test_rounds_lower_the_validation_loss(trained):
    _, _, before, metrics = trained
    assert np.all(np.isfinite(metrics["train"]["train_loss"]))
    assert np.mean(metrics["val"]["loss"]) < np.mean(before) - 0.05


def test_generalist_shared_specialists_and_routers_personal(trained):
    start, end, _, _ = trained
    for name, value in end.items():
        if "experts" in name:
            np.testing.assert_array_equal(
                value[:, 0], np.broadcast_to(value[0, 0], value[:, 0].shape)
            )
            assert not np.allclose(value[0, 0], start[name][0, 0])  # and it trained
            if name.endswith(".b"):
                # Clients 0 and 1 have the specialist slot 1 and trained it differently; client 2
                # (one expert) never routes to it: its B stays at the initial zeros.
                assert not np.allclose(value[0, 1], value[1, 1])
                np.testing.assert_array_equal(value[2, 1:], 0.0)
        elif "router" in name:
            assert not np.allclose(value[0], value[1])
        elif "expert_mask" in name:
            np.testing.assert_array_equal(value, np.arange(3) < np.array([[3], [2], [1]]))
        else:  # attention LoRA: global
            np.testing.assert_array_equal(value, np.broadcast_to(value[0], value.shape))


@functools.cache
def one_round(schedule: BiLevel, frozen_experts: bool):
    """Parameters before and after one round without aggregation; `frozen_experts`: the expert
    optimizer is `set_to_zero`."""
    algo = comigs(
        problem(optax.set_to_zero() if frozen_experts else None),
        CoMiGSOptions(moe=MOE, schedule=schedule, policy="none"),
    )
    sim = algo.init(jax.random.key(1))
    merged = lambda clients: flat(nnx.merge_state(clients.params, clients.frozen))
    return merged(sim.clients), merged(algo.round(sim)[0].clients)


def test_router_and_expert_updates_touch_only_their_own_parameters():
    """Experts frozen by a zero optimizer: only routers move (router blocks run); no router block
    (τ longer than the run): routers stay at their initial draw while experts move."""
    start, end = one_round(FAST, True)
    for name in start:
        assert np.array_equal(start[name], end[name]) != ("router" in name), name
    start, end = one_round(BiLevel(router_every=1000, router_steps=2), False)
    moved = {name for name in start if not np.array_equal(start[name], end[name])}
    assert not {name for name in moved if "router" in name or "expert_mask" in name}
    assert any("experts" in name for name in moved)


def test_reference_grad_leak_changes_the_router_step():
    """With the leak the first router step of a block also applies the accumulated training
    gradients, so the routers differ from the clean run; experts (frozen) do not."""
    _, clean = one_round(FAST, True)
    _, leak = one_round(dataclasses.replace(FAST, reference_grad_leak=True), True)
    for name, value in clean.items():
        if "router" in name:
            assert not np.allclose(value, leak[name]), name
        else:
            np.testing.assert_array_equal(value, leak[name])


@pytest.mark.parametrize("policy", POLICIES)
def test_mask_policies(policy):
    n, e = 2, 3
    tree = {
        "h": {
            "attn": {"lora": {"a": jnp.zeros((n, 4, 2)), "b": jnp.zeros((n, 2, 4))}},
            "mlp": {
                "experts": {
                    "c_fc": {
                        "a": Expert(jnp.zeros((n, e, 4, 2))),
                        "b": Expert(jnp.zeros((n, e, 2, 8))),
                    }
                },
                "router": {"w": Router(jnp.zeros((n, 4, e)))},
            },
        }
    }
    got = flat(
        jax.tree.map(lambda m, x: np.broadcast_to(m, x.shape)[0], global_mask(tree, policy), tree)
    )
    slots = {"none": 0, "all": e, "experts": e, "expert_0": 1, "expert_01": 2, "ffa": e, "fedsa": e}
    for name, mask in got.items():
        if "router" in name:
            want = policy == "all"
        elif policy == "fedsa":
            want = name.endswith(".a")
        elif "experts" in name:
            want = (np.arange(e) < slots[policy])[:, None, None]
        else:
            want = policy != "none"
        np.testing.assert_array_equal(mask, np.broadcast_to(want, mask.shape), err_msg=name)


def test_variants_are_registered_with_the_papers_settings():
    """Tables 1 and 4: (policy, alternating, router split) of every variant, and each builds an
    algorithm logged under its own name."""
    table = {
        "comigs": ("expert_0", True, "val"),
        "comigs-2g": ("experts", True, "val"),
        "comigs-2s": ("none", True, "val"),
        "comigs-tr": ("expert_0", True, "train"),
        "pfedmoe": ("expert_0", False, "val"),
        "local-moe": ("none", False, "val"),
        "fedavg-moe": ("experts", False, "val"),
    }
    for name, expected in table.items():
        o = get_method(name).options
        assert (o.policy, o.schedule.alternating, o.schedule.router_split) == expected
        assert get_method(name)(problem(), moe=MOE).name == name
