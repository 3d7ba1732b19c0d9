"""One battery over every registered method (`METHODS`), on one tiny problem: every method gets
the guarantees of the one round (`fedjax_lora.algorithms.base.build`).

Per method: two rounds run and stay finite; round 2 compiles nothing; a checkpoint of the state
after round 1 round-trips and the resumed round 2 equals the uninterrupted one bit for bit; a
method that declares vectorized sweeps runs under the sweep's vmapped round, the others are
refused. Round 1 under `map` (the setup's strategy) agrees to 1e-5 with round 1 under `sharded`
over 2 of the 4 forced CPU devices with `vmap` inside, under a cohort of every client (K = N)
for a method that takes cohorts: every method's client program batched, its server program on
client-sharded arrays, and the cohort's gather and scatter, in one more compilation
(`centralized`'s one pooled client: one group of 4 devices; more groups are refused). A method
that does not take cohorts refuses them before any compute.
Every method declares what a round moves (`ServerProgram.comm`): bytes for every client, zero
exactly for the methods that exchange nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from fedjax_lora import config as config_lib
from fedjax_lora.algorithms import METHODS
from fedjax_lora.checkpoint import Checkpointer
from fedjax_lora.engine.cohort import Cohort
from fedjax_lora.errors import ConfigError
from fedjax_lora.experiment import build_problem, method_factory
from fedjax_lora.settings import Strategy
from fedjax_lora.sweep import run_members

OVERRIDES = [
    "data.num_groups=2",
    "data.clients_per_group=2",
    "data.tokens_per_client=1200",
    "data.aux_fraction=0.1",
    "model.d_model=16",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.d_ff=32",
    "model.max_positions=64",
    "training.steps=1",
    "training.batch_size=2",
    "training.seq_len=16",
    "eval.max_windows=4",
    "eval.batch_size=4",
    "rounds=2",
    "tracking.progress=false",
    "tracking.tensorboard=false",
]
# FedAMoLE's default pool (30 experts, 2 holders each) needs more than 4 clients.
AMOLE = [
    "amole={targets: [c_attn.q, c_attn.v], num_experts: 4, rank: 2}",
    "clients_per_expert=2",
    "min_experts=2",
    "max_experts=4",
]
OPTIONS = [f"method_options.{m}.{o}" for m in ("fedamole", "fedamole-r") for o in AMOLE]
# The CoMiGS family's random router batches need the whole validation stream as windows.
OPTIONS += [
    f"method_options.{m}.router_batches=windows"
    for m, spec in METHODS.items()
    if hasattr(spec.options, "router_batches")
]

# The strategies compared with `map`, in one compilation: `vmap` clients (2 per device) inside
# `sharded` client groups. A method sees the strategy only through `map_clients` and the
# placements, so this runs every code path that `vmap` and `sharded` (inner `map`) run; the
# strategies themselves are compared on every kind in tests/test_engine.py.
SHARDED_VMAP = Strategy(kind="sharded", inner="vmap", num_devices=2)
# One pooled client: one client group of the 4 devices.
POOLED = Strategy(kind="sharded", inner="vmap", model_devices=4)


@pytest.fixture(scope="module")
def setup():
    # Built for every method, so each one's declared side data is there.
    methods = f"methods=[{','.join(sorted(METHODS))}]"
    config = config_lib.load(None, [*OVERRIDES, *OPTIONS, methods])
    problem, _ = build_problem(config)
    return config, problem


def _leaves(tree) -> list[np.ndarray]:
    """Every leaf as NumPy (PRNG keys as their key data)."""
    key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    data = lambda x: jax.random.key_data(x) if key(x) else x
    return [np.asarray(data(x)) for x in jax.tree.leaves(jax.device_get(tree))]


def _close(a, b, tol: float = 1e-5, what: str = "") -> None:
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(
            x.astype(np.float64), y.astype(np.float64), rtol=tol, atol=tol, err_msg=what
        )


def _lowerings() -> list[str]:
    """The names of the programs lowered from here on (a recompilation lowers again, also when
    the persistent compilation cache then supplies the executable)."""
    events: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: (
            events.append(kw.get("fun_name", event))
            if event == "/jax/core/compile/jaxpr_to_mlir_module_duration"
            else None
        )
    )
    return events


LOWERED = _lowerings()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name, setup, tmp_path):
    config, problem = setup
    algo = method_factory(name, config)(problem)
    assert algo.name == name  # logged under the name it was run as
    sim0 = algo.init(jax.random.key(0))
    sim1, metrics1 = algo.round(sim0)
    for split in ("train", "val"):
        for x in _leaves(metrics1[split]):
            assert np.all(np.isfinite(x)), f"{name}: non-finite {split} metric"

    # One more compilation checks two guarantees: the strategies agree, and a method that takes
    # cohorts gives under a cohort of every client (K = N) what full participation gives.
    assert problem.strategy.kind == "map"
    strategy = POOLED if name == "centralized" else SHARDED_VMAP
    cohorts = algo.method.capabilities.cohorts
    everyone = Cohort(problem.num_clients) if cohorts else None
    other = dataclasses.replace(problem, strategy=strategy, cohort=everyone)
    sharded = method_factory(name, config)(other)
    _, sharded_metrics = sharded.round(sharded.init(jax.random.key(0)))
    train = dict(sharded_metrics["train"])
    if cohorts:
        np.testing.assert_array_equal(train.pop("cohort"), np.arange(problem.num_clients))
    what = f"{name} under {strategy}" + (" and a cohort of every client" if cohorts else "")
    _close(metrics1["val"], sharded_metrics["val"], what=f"{what}: val")
    _close(metrics1["train"], train, what=f"{what}: train")

    checkpoints = Checkpointer(tmp_path)
    checkpoints.save(1, sim1, [])
    step, restored, _ = checkpoints.restore_latest(sim1)
    checkpoints.close()
    assert step == 1
    for a, b in zip(_leaves(sim1), _leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)

    before = len(LOWERED)
    sim2, metrics2 = algo.round(sim1)
    jax.block_until_ready(sim2)
    assert LOWERED[before:] == [], f"{name}: round 2 compiled {LOWERED[before:]}"
    assert int(sim2.round) == 2
    resumed, resumed_metrics = algo.round(restored)
    for a, b in zip(_leaves((sim2, metrics2)), _leaves((resumed, resumed_metrics)), strict=True):
        np.testing.assert_array_equal(a, b)

    if not cohorts:  # refused before any compute
        with pytest.raises(ValueError, match="unset data.cohort_size"):
            method_factory(name, config)(
                dataclasses.replace(problem, cohort=Cohort(problem.num_clients))
            )

    one_round = dataclasses.replace(config, rounds=1)
    if algo.method.capabilities.sweeps:
        (member,) = run_members(name, [problem], one_round, [0], [config.optimizer.lr])
        assert not member["diverged"] and len(member["records"]) == 2
    elif not algo.method.capabilities.sweeps:
        with pytest.raises(ValueError, match="cannot be vectorized"):
            run_members(name, [problem], one_round, [0], [config.optimizer.lr])


# Nothing leaves a client: local training, one pooled model, CoMiGS with every expert local.
NO_EXCHANGE = {"local", "centralized", "comigs-2s", "local-moe"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_reports_its_bytes(name, setup):
    config, problem = setup
    algo = method_factory(name, config)(problem)
    comm = algo.method.server.comm
    assert comm is not None, f"{name}: ServerProgram.comm is not declared"
    clients = jax.device_get(algo.init(jax.random.key(0)).clients)
    exchange = comm(clients)
    rows = jax.tree.leaves(clients.params)[0].shape[0]  # centralized: one pooled client
    for sent in exchange:
        assert sent.shape == (rows,) and sent.dtype == np.int64
        if name in NO_EXCHANGE:
            assert np.all(sent == 0), f"{name} exchanges nothing, reported {sent}"
        else:
            assert np.all(sent > 0), f"{name}: no bytes reported for some client: {sent}"


def test_centralized_refuses_client_groups_it_cannot_split(setup):
    config, problem = setup
    four = dataclasses.replace(problem, strategy=Strategy(kind="sharded"))
    with pytest.raises(ConfigError, match="one pooled client.*4 client groups.*model_devices"):
        method_factory("centralized", config)(four)
