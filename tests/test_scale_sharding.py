"""Device meshes give the numbers of one device: the `(clients, model)` mesh of the `sharded`
strategy on the 4 forced host devices of the test session, and on 8 forced host devices in a
subprocess; the base really is sharded over the `model` axis."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from fedjax_lora.algorithms import fedavg, install
from fedjax_lora.algorithms.comigs import with_moe
from fedjax_lora.algorithms.fedamole import with_amole
from fedjax_lora.algorithms.lora_baselines import with_ranks
from fedjax_lora.algorithms.prompt_baselines import with_prompt
from fedjax_lora.amole import AMoLEConfig
from fedjax_lora.engine import Strategy
from fedjax_lora.engine.cohort import Cohort
from fedjax_lora.models.layers import ClientFrozen
from fedjax_lora.moe import MoEConfig
from fedjax_lora.prompt_tuning import PromptTuningConfig
from tests.tiny import tiny_problem

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 2


def run_fedavg(strategy: Strategy, cohort: Cohort | None = None) -> dict[str, np.ndarray]:
    """Final adapters and per-round validation perplexities of FedAvg on 8 tiny clients."""
    problem = dataclasses.replace(tiny_problem(num_clients=8, strategy=strategy), cohort=cohort)
    algo = fedavg(problem)
    sim = algo.init(jax.random.key(0))
    ppl = []
    for _ in range(ROUNDS):
        sim, metrics = algo.round(sim)
        ppl.append(np.asarray(metrics["val"]["ppl"]))
    out = {f"param{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(sim.clients.params))}
    out["ppl"] = np.stack(ppl)
    return out


def assert_same_numbers(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def one_device():
    return {
        "full": run_fedavg(Strategy("map")),
        "cohort": run_fedavg(Strategy("map"), Cohort(4, "tokens")),
    }


@pytest.mark.parametrize(
    "strategy",
    [
        Strategy("sharded", model_devices=2),
        Strategy("sharded", model_devices=4, inner="vmap"),
    ],
    ids=["2x2", "1x4-vmap"],
)
def test_a_clients_by_model_mesh_gives_the_one_device_numbers(strategy, one_device):
    assert len(jax.devices()) == 4
    assert_same_numbers(run_fedavg(strategy), one_device["full"], str(strategy))


def test_cohorts_on_a_mesh_give_the_one_device_numbers(one_device):
    got = run_fedavg(Strategy("sharded", model_devices=2), Cohort(4, "tokens"))
    assert_same_numbers(got, one_device["cohort"], "cohort on a 2x2 mesh")


def test_the_base_is_sharded_over_the_model_axis():
    problem = tiny_problem(num_clients=4, strategy=Strategy("sharded", model_devices=2))
    mesh = problem.strategy.mesh()
    assert dict(mesh.shape) == {"clients": 2, "model": 2}
    specs = {
        "/".join(map(str, path)): x.sharding.spec
        for path, x in jax.tree_util.tree_leaves_with_path(problem.base)
    }
    embedding = next(s for p, s in specs.items() if "wte" in p)
    assert tuple(embedding) == ("model", None)  # vocabulary-parallel [V, d]
    kernel = next(s for p, s in specs.items() if "c_fc" in p and "kernel" in p)
    assert tuple(kernel) == (None, "model")  # output features of (in, out)
    for x in jax.tree.leaves(problem.base):
        assert len(x.sharding.device_set) == 4
        assert x.addressable_shards[0].data.size * 2 == x.size or x.ndim == 1


def test_bad_mesh_settings_are_rejected():
    with pytest.raises(ValueError, match="only strategy.kind='sharded'"):
        Strategy("map", model_devices=2)
    with pytest.raises(ValueError, match="groups of model_devices=3"):
        Strategy("sharded", model_devices=3).mesh()
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny_problem(num_clients=3, strategy=Strategy("sharded", model_devices=2))


def _eight_device_child(out: str) -> None:
    """Runs in a subprocess with 8 forced host devices."""
    assert len(jax.devices()) == 8
    results = {
        "8x1": run_fedavg(Strategy("sharded")),
        "4x2": run_fedavg(Strategy("sharded", model_devices=2)),
        "2x4-vmap": run_fedavg(Strategy("sharded", model_devices=4, inner="vmap")),
        "cohort-4x2": run_fedavg(Strategy("sharded", model_devices=2), Cohort(4, "tokens")),
    }
    np.savez(out, **{f"{name}:{k}": v for name, r in results.items() for k, v in r.items()})


def test_eight_host_devices_give_the_one_device_numbers(tmp_path, one_device):
    out = tmp_path / "eight.npz"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true"
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    code = f"import tests.test_scale_sharding as t; t._eight_device_child({str(out)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = np.load(out)
    for name in ("8x1", "4x2", "2x4-vmap", "cohort-4x2"):
        got = {k.split(":", 1)[1]: saved[k] for k in saved.files if k.startswith(name + ":")}
        want = one_device["cohort" if name.startswith("cohort") else "full"]
        assert_same_numbers(got, want, f"8 devices, {name}")


def _host_copies(model) -> None:
    """A surgery that replaces the base's weights by fresh host arrays (nothing placed)."""
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_value(np.array(var.get_value()))


@pytest.mark.parametrize("surgery", ["host", "ranks", "moe", "amole", "prompt"])
def test_every_surgery_places_the_base_over_the_model_axis(surgery):
    """`install` (the seam of `with_ranks`, `with_moe`, `with_amole`, `with_prompt`) re-places
    the changed model's base as the strategy wants it: with `model_devices=2` on the 4 forced
    devices, the embedding and the frozen MLP kernel are split over the `model` axis, and the
    per-client frozen variables are in `Problem.frozen`, not in the base."""
    problem = tiny_problem(num_clients=4, strategy=Strategy("sharded", model_devices=2))
    changed = {
        "host": lambda: install(problem, _host_copies),
        "ranks": lambda: with_ranks(problem, (2, 4, 3, 4)),
        "moe": lambda: with_moe(problem, MoEConfig(num_experts=2, rank=2)),
        "amole": lambda: with_amole(
            problem, AMoLEConfig(targets=("c_attn.q",), num_experts=2, rank=2, top_k=1)
        ),
        "prompt": lambda: with_prompt(problem, PromptTuningConfig(num_virtual_tokens=2)),
    }[surgery]()
    specs = {
        "/".join(map(str, path)): x.sharding.spec
        for path, x in jax.tree_util.tree_leaves_with_path(changed.base)
    }
    assert tuple(next(s for p, s in specs.items() if "wte" in p)) == ("model", None)
    kernel = next(s for p, s in specs.items() if "c_fc" in p and "kernel" in p)
    assert tuple(kernel) == (None, "model")
    for x in jax.tree.leaves(changed.base):
        assert len(x.sharding.device_set) == 4
    assert not jax.tree.leaves(nnx.split_state(changed.base, ClientFrozen, ...)[0])
    assert bool(jax.tree.leaves(changed.frozen)) == (surgery not in ("host", "prompt"))
