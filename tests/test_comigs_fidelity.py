"""The CoMiGS reference's protocol (issue 14, points 1-3 and 5) against NumPy transcriptions of
the authors' code paths: evaluation of the local models before the server average, the
load-balancing loss on the block output (`GPT.forward`), the FlexLoRA server's accumulator reset
(`Server.update_parameters`), and router batches at random offsets of the validation stream."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lora import aggregation as agg
from fedjax_lora.aggregation import local_aggregator
from fedjax_lora.algorithms import get_method
from fedjax_lora.algorithms.base import federated
from fedjax_lora.algorithms.comigs import CoMiGSOptions, comigs, val_stream
from fedjax_lora.data.streams import eval_windows, stack_streams
from fedjax_lora.engine.batches import Batch
from fedjax_lora.engine.loss import lm_loss
from fedjax_lora.models.layers import Adapter
from fedjax_lora.moe import MoEConfig, install_moe
from fedjax_lora.moe.comigs import GPT2BlockLBOnOutput
from tests.test_lora_baselines import D_IN, D_OUT, R_MAX, RANKS, as_jax, ranked_tree
from tests.tiny import SEQ, client_streams, tiny_model, tiny_problem

# ---------------------------------------------------------------- 1: evaluation timing


@functools.cache
def problem():
    return tiny_problem(num_clients=3, steps=2, lr=2e-2, val_windows=64)


def test_local_evaluation_sees_the_models_before_the_average():
    """fedavg(evaluate="local") reports what the same training without aggregation reports; the
    state after the round is the aggregated one either way."""
    p = problem()
    key = jax.random.key(3)
    local_eval = get_method("fedavg")(p, evaluate="local")
    after = get_method("fedavg")(p)
    unaggregated = federated("ref", p, local_aggregator(), shared_init=True)
    leaves = lambda sim: jax.tree.leaves(sim.clients.params)
    sim_l, m_l = local_eval.round(local_eval.init(key))
    sim_a, m_a = after.round(after.init(key))
    _, m_ref = unaggregated.round(unaggregated.init(key))
    np.testing.assert_allclose(m_l["val"]["loss"], m_ref["val"]["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_a["val"]["loss"], after.evaluate(sim_a)["val"]["loss"], rtol=1e-6)
    for x, y in zip(leaves(sim_l), leaves(sim_a), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(m_l["val"]["loss"], m_a["val"]["loss"])


@pytest.mark.parametrize(
    "name", ["comigs", "comigs-2g", "pfedmoe", "fedavg-moe", "hetlora", "flexlora", "ffa-lora"]
)
def test_comigs_family_evaluates_local_models_by_default(name):
    assert get_method(name).options.evaluate == "local"
    with pytest.raises(ValueError, match="evaluate must be"):
        get_method(name)(problem(), evaluate="before")


# ---------------------------------------------------------------- 2: LB on the block output


def np_reference_lb(x: np.ndarray, w: np.ndarray, k: int, pi: float) -> float:
    """`MoE.get_load_balancing_loss(x)` of the reference (top-k ≥ 2), transcribed."""
    logits = x.reshape(-1, x.shape[-1]) @ w
    e = logits.shape[-1]
    index = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    scattered = np.zeros_like(logits)
    np.put_along_axis(scattered, index, np.take_along_axis(logits, index, 1), 1)
    select = np.exp(scattered - scattered.max(1, keepdims=True))
    select /= select.sum(1, keepdims=True)
    mask = np.zeros_like(logits)
    for j in range(k):
        mask[np.arange(len(logits)), index[:, j]] += 1.0 / k
    factors = np.ones(e)
    factors[1:] *= (e - 1) / (1 - pi)
    factors[0] /= pi
    factors /= e
    return float((select.mean(0) * mask.mean(0) * factors).mean() * e**2)


@pytest.mark.filterwarnings("ignore:Using 'Module.sow")
@pytest.mark.parametrize("pi", [0.5, 0.8])
def test_reference_lb_is_taken_on_the_block_output(pi):
    cfg = MoEConfig(num_experts=3, top_k=2, rank=2, generalist_share=pi)
    losses = {}
    for quirk in (False, True):
        model = tiny_model()
        install_moe(
            model,
            MoEConfig(**{**cfg.__dict__, "reference_lb_on_block_output": quirk}),
            key=jax.random.key(1),
        )
        graphdef, params, base = nnx.split(model, Adapter, ...)
        tokens = jax.random.randint(jax.random.key(2), (2, SEQ + 1), 0, 64)
        batch = Batch(tokens[:, :-1], tokens[:, 1:], jnp.ones((2, SEQ)))
        losses[quirk] = float(lm_loss(graphdef, params, base, batch, None)[1]["aux"])
    assert isinstance(model.transformer.h[0], GPT2BlockLBOnOutput)
    x = model.input_embeddings(batch.inputs, None) + model.transformer.wpe(jnp.arange(SEQ))
    want = []
    for block in model.transformer.h:
        x, _ = block(x, None, None)
        want.append(np_reference_lb(np.asarray(x), np.asarray(block.mlp.router.w[...]), 2, pi))
    np.testing.assert_allclose(losses[True], cfg.lb_coef * np.mean(want), rtol=1e-5)
    assert abs(losses[True] - losses[False]) > 1e-6


def test_reference_lb_flag_rejects_the_cv2_loss():
    with pytest.raises(ValueError, match="reference_lb_on_block_output"):
        MoEConfig(balance_loss="cv2", reference_lb_on_block_output=True)


# ---------------------------------------------------------------- 3: FlexLoRA's reference server


def np_reference_flexlora(tree, tokens):
    """`Server.aggregate_parameters` with `FlexloraAggregationStrategy` on torch layouts
    (`lora_A [r, in]`, `lora_B [out, r]`, server rank R_MAX), then `to_client_data`."""
    m = tree["mlp"]["lora"]
    server = {"A": np.zeros((R_MAX, D_IN)), "B": np.zeros((D_OUT, R_MAX))}
    state = {}
    for i, r in enumerate(RANKS):
        a_t = np.asarray(m["a"][i][:, :r], np.float64).T
        b_t = np.asarray(m["b"][i][:r], np.float64).T
        update = (b_t @ a_t * (16 / r)) * tokens[i] / tokens.sum()
        for name in ("A", "B"):
            if name not in state:
                state[name] = np.zeros_like(server[name])
            if update.shape[0] > server[name].shape[0] or update.shape[1] > server[name].shape[1]:
                state[name] = np.zeros_like(update)
            state[name][: update.shape[0], : update.shape[1]] += update
    u, s, vt = np.linalg.svd(state["A"], full_matrices=False)
    new_a = vt[:R_MAX]  # _svd: rank == dims[0] -> V.T[:rank]
    new_b = u[:, :R_MAX] @ np.diag(s[:R_MAX]) / (16 / R_MAX)
    return [(new_a[:r].T, new_b[:, :r].T) for r in RANKS]  # jax layouts [in, r], [r, out]


def test_flexlora_reference_accumulator_matches_the_reference_server():
    tree = ranked_tree(seed=11)
    tokens = np.array([100.0, 300.0, 50.0, 250.0])
    out, _ = jax.jit(agg.flexlora_aggregator(16.0, reference_accumulator=True).apply)(
        as_jax(tree), (), {"weights": jnp.asarray(tokens)}
    )
    got = out["mlp"]["lora"]
    for i, (a_want, b_want) in enumerate(np_reference_flexlora(tree, tokens)):
        r = RANKS[i]
        a_got = np.asarray(got["a"][i][:, :r], np.float64)
        b_got = np.asarray(got["b"][i][:r], np.float64)
        # singular vectors are defined up to sign: compare the products
        np.testing.assert_allclose(a_got @ b_got, a_want @ b_want, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got["a"][i][:, r:], 0.0)


# ---------------------------------------------------------------- 5: router batches


def test_val_stream_rebuilds_the_validation_stream():
    streams = client_streams(2, length=200)
    ct = stack_streams(streams)
    windows, valid = eval_windows(ct, SEQ, 64)
    for i, s in enumerate(streams):
        w = jnp.asarray(windows[i])
        weights = jnp.asarray(np.broadcast_to(valid[i][:, None], (len(valid[i]), SEQ)), jnp.float32)
        tokens, length, mask = val_stream(w, weights)
        n = (len(s) - 1) // SEQ
        assert int(length) == n * SEQ + 1
        np.testing.assert_array_equal(np.asarray(tokens)[: n * SEQ + 1], s[: n * SEQ + 1])
        np.testing.assert_array_equal(np.asarray(mask)[1 : n * SEQ + 1], 1.0)


def test_random_router_batches_need_the_whole_validation_stream():
    sub = tiny_problem(num_clients=3, val_windows=4)  # 4 of 18 windows: not the whole stream
    with pytest.raises(ValueError, match="router_batches"):
        comigs(sub, CoMiGSOptions(moe=MoEConfig(rank=2)))
    # the fixed windows are fine
    comigs(sub, CoMiGSOptions(moe=MoEConfig(rank=2), router_batches="windows"))


def test_router_batch_sources_differ():
    from fedjax_lora.algorithms.comigs import BiLevel

    schedule = BiLevel(router_every=1, router_steps=2)
    routers = {}
    for source in ("random", "windows"):
        options = CoMiGSOptions(moe=MoEConfig(rank=2), schedule=schedule, router_batches=source)
        algo = comigs(problem(), options)
        sim, metrics = algo.round(algo.init(jax.random.key(0)))
        assert np.all(np.isfinite(metrics["val"]["loss"]))
        routers[source] = [
            np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(sim.clients.params)
            if "router" in jax.tree_util.keystr(p)
        ]
    assert not all(
        np.allclose(a, b) for a, b in zip(routers["random"], routers["windows"], strict=True)
    )
