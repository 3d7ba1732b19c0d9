"""FedAMoLE: the AMoLE module against NumPy per-token loops, holder-masked aggregation against a
NumPy loop, the RSEA statistics against direct means, and tiny end-to-end runs."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_lora import amole, lora
from fedjax_lora.aggregation import holder_average
from fedjax_lora.algorithms import METHODS, Problem
from fedjax_lora.algorithms.fedamole import FedAMoLEOptions, fedamole
from fedjax_lora.data.streams import eval_windows, stack_streams
from fedjax_lora.engine import Batch, LocalTraining, OptimizerConfig, lm_loss
from fedjax_lora.engine.loss import routing_tokens
from fedjax_lora.engine.train import stream_sampler
from fedjax_lora.models.factory import from_config
from fedjax_lora.models.layers import Embed, Linear
from tests.tiny import CONFIG, SEQ, VOCAB, client_streams

D, OUT, E, R = 6, 5, 5, 3
CFG = amole.AMoLEConfig(targets=("proj",), num_experts=E, rank=R, alpha=6.0, dropout=0.0)
CFG_MODEL = amole.AMoLEConfig(targets=("c_attn.q", "c_attn.v"), num_experts=E, rank=R)


def filled_module(seed: int, held) -> amole.AMoLE:
    """An AMoLE with every factor random (B too, so every path carries signal)."""
    rng = np.random.default_rng(seed)
    m = amole.AMoLE(D, OUT, CFG)
    m.experts_a.set_value(jnp.asarray(rng.normal(size=(E, D, R)), jnp.float32))
    m.experts_b.set_value(jnp.asarray(rng.normal(size=(E, R, OUT)), jnp.float32))
    m.token_proj.set_value(jnp.asarray(rng.normal(size=(D, R)), jnp.float32))
    m.shared.a.set_value(jnp.asarray(rng.normal(size=(D, R)), jnp.float32))
    m.shared.b.set_value(jnp.asarray(rng.normal(size=(R, OUT)), jnp.float32))
    m.held.set_value(jnp.asarray(held, bool))
    return m


def run_captured(m: amole.AMoLE, x):
    forward = nnx.capture(lambda mod, v: mod(v), nnx.Intermediate, amole.RoutingEmbeddings)
    y, inter, emb = forward(m, x)
    (lb,) = inter["aux_loss"].get_value()
    ((token, keys),) = emb["embeddings"].get_value()
    return y, lb, token, keys


def np_amole(m: amole.AMoLE, x: np.ndarray):
    """Per-token loop: softmax over held experts, top-2 renormalised, shared expert, LB loss."""
    a, b = np.asarray(m.experts_a[...], np.float64), np.asarray(m.experts_b[...], np.float64)
    w, held = np.asarray(m.token_proj[...], np.float64), np.asarray(m.held[...])
    sa, sb = np.asarray(m.shared.a[...], np.float64), np.asarray(m.shared.b[...], np.float64)
    s, idx = CFG.alpha / R, [e for e in range(E) if held[e]]
    ys, probs, counts = [], [], np.zeros(E)
    for xt in np.asarray(x, np.float64).reshape(-1, D):
        t = xt @ w
        logits = np.array([(xt @ a[e]) @ t / math.sqrt(R) for e in idx])
        p = np.zeros(E)
        p[idx] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        top = sorted(idx, key=lambda e: -p[e])[:2]
        y = s * xt @ sa @ sb
        for e in top:
            y = y + p[e] / sum(p[j] for j in top) * s * (xt @ a[e] @ b[e])
            counts[e] += 1
        ys.append(y)
        probs.append(p)
    f = counts / (2 * len(ys))
    lb = CFG.load_balance * len(idx) * float(np.sum(np.mean(probs, 0) * f))
    return np.stack(ys).reshape(*x.shape[:-1], OUT), lb


X = np.random.default_rng(9).normal(size=(2, 7, D)).astype(np.float32)


@pytest.mark.parametrize("held", [[1, 0, 1, 1, 0], [0, 1, 0, 0, 1], [1, 1, 1, 1, 1]])
def test_module_matches_numpy_per_token_reference(held):
    m = filled_module(0, held)
    y, lb, token, keys = run_captured(m, X)
    want_y, want_lb = np_amole(m, X)
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lb, want_lb, rtol=1e-5)
    np.testing.assert_allclose(token, X @ np.asarray(m.token_proj[...]), rtol=1e-5, atol=1e-5)
    chex.assert_shape(keys, (2, 7, E, R))
    # A plain call (no capture: evaluation) gives the same output and records nothing.
    np.testing.assert_allclose(m(X), y, rtol=1e-6)


def test_load_balance_counts_only_real_tokens():
    """docs/fidelity.md FedAMoLE row 3: under the batch's real-token mask the LB loss is the
    reference's (`MoLELinear.forward`: a mean over every position of its batch) over the real
    tokens alone; for one padded row, exactly the reference at its batch size 1 on the example."""
    m = filled_module(3, [1, 1, 0, 1, 1])
    mask = np.zeros((2, 7), np.float32)
    mask[0, :5], mask[1, :3] = 1, 1
    with routing_tokens(jnp.asarray(mask)):
        _, lb, _, _ = run_captured(m, X)
    np.testing.assert_allclose(lb, np_amole(m, X[mask > 0])[1], rtol=1e-5)
    with routing_tokens(jnp.asarray(mask[:1])):
        _, lb_row, _, _ = run_captured(m, X[:1])
    np.testing.assert_allclose(lb_row, np_amole(m, X[0, :5])[1], rtol=1e-5)
    _, lb_all, _, _ = run_captured(m, X[:1])  # no mask: the padding counts
    assert abs(float(lb_all) - float(lb_row)) > 1e-6
    with routing_tokens(jnp.ones((1, 7))), pytest.raises(ValueError, match="routing token mask"):
        run_captured(m, X)


def test_example_rows_route_without_their_padding():
    """One right-padded example row through `LocalTraining(packing="examples")`'s sampler and
    `lm_loss`: its real-token mask is the example's positions, and the LB loss equals that of the
    example alone, unpadded (the reference at batch size 1)."""
    rng = np.random.default_rng(5)
    model = from_config(CONFIG, seed=0)
    amole.add_amole(model, CFG_MODEL, key=jax.random.key(1))
    graphdef, params, base = lora.split(model)
    lengths, prompt, eos = (9, 13, 16), 4, 1
    slots = np.full((len(lengths), SEQ + 1), eos, np.int32)
    mask = np.zeros_like(slots)
    for i, n in enumerate(lengths):
        slots[i, :n] = rng.integers(2, VOCAB, n)
        slots[i, n - 1] = eos
        mask[i, prompt:n] = 1
    cfg = LocalTraining(steps=1, batch_size=1, seq_len=SEQ, sampling="epoch", packing="examples")
    sample = stream_sampler(
        cfg,
        jnp.asarray(slots.reshape(-1)),
        jnp.asarray(slots.size),
        jnp.asarray(mask.reshape(-1)),
        jax.random.key(2),
        max_windows=len(lengths),
    )
    for counter in range(len(lengths)):
        batch = sample(jax.random.key(0), jnp.asarray(counter))
        (row,) = [i for i in range(len(lengths)) if np.all(slots[i, :SEQ] == batch.inputs[0])]
        n = lengths[row]
        np.testing.assert_array_equal(batch.tokens[0], np.arange(SEQ) < n)
        aux = lm_loss(graphdef, params, base, batch, None)[1]["aux"]
        ids = jnp.asarray(slots[row, None, :n])
        alone = Batch(ids, ids, jnp.ones(ids.shape, jnp.float32))
        np.testing.assert_allclose(aux, lm_loss(graphdef, params, base, alone, None)[1]["aux"])
        if n < SEQ:  # without the mask the padding would count
            padded = lm_loss(graphdef, params, base, batch._replace(tokens=None), None)[1]["aux"]
            assert abs(float(padded) - float(aux)) > 1e-7


def test_all_held_is_a_standard_top2_moe():
    """Full pool: gates are the softmax over the two largest router logits."""
    m = filled_module(1, np.ones(E))
    a, b = m.experts_a[...], m.experts_b[...]
    keys = jnp.einsum("btd,edr->bter", X, a, precision="highest")
    logits = jnp.einsum("bter,btr->bte", keys, X @ m.token_proj[...]) / math.sqrt(R)
    top_logits, top_idx = jax.lax.top_k(logits, 2)
    gates = jax.nn.softmax(top_logits, -1)
    experts = jnp.einsum("btd,edr,ero->bteo", X, a, b, precision="highest") * CFG.alpha / R
    chosen = jnp.take_along_axis(experts, top_idx[..., None], axis=2)
    want = m.shared(X) + jnp.sum(gates[..., None] * chosen, axis=2)
    np.testing.assert_allclose(m(X), want, rtol=1e-4, atol=1e-4)


def test_gradients_to_non_held_experts_are_exactly_zero():
    held = np.array([1, 0, 1, 0, 1], bool)
    m = filled_module(2, held)
    graphdef, params, rest = nnx.split(m, lora.Adapter, ...)
    probe = np.random.default_rng(0).normal(size=(2, 7, OUT))

    def loss(p):
        y, lb, _, _ = run_captured(nnx.merge(graphdef, p, rest), X)
        return jnp.sum(y * probe) + lb

    grads = jax.jit(jax.grad(loss))(params)
    for name in ("experts_a", "experts_b"):
        g = np.asarray(grads[name][...])
        assert np.all(g[~held] == 0.0), name
        assert np.all(np.abs(g[held]).reshape(held.sum(), -1).max(1) > 0), name
    assert np.all(np.isfinite(np.asarray(grads["token_proj"][...])))


def test_add_amole_draws_independent_experts():
    model = from_config(CONFIG, seed=0)
    cfg = amole.AMoLEConfig(targets=("c_attn.q", "c_attn.v"), num_experts=4, rank=4)
    paths = amole.add_amole(model, cfg, key=jax.random.key(1))
    assert paths == ["transformer.h.0.attn.c_attn.q", "transformer.h.0.attn.c_attn.v"]
    module = model.transformer.h[0].attn.c_attn.lora_q
    a = np.asarray(module.experts_a[...])
    bound = 1 / math.sqrt(CONFIG.d_model)
    assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.5 * bound
    assert len({a[e].tobytes() for e in range(4)}) == 4
    assert not np.any(np.asarray(module.experts_b[...]))
    assert np.all(np.asarray(module.held[...]))
    with pytest.raises(ValueError, match="adapter target 'k_proj'"):
        amole.add_amole(model, amole.AMoLEConfig(targets=("k_proj",)))


def test_holder_average_matches_numpy_loop():
    rng = np.random.default_rng(0)
    n = 4
    tree = {
        "experts_a": rng.normal(size=(n, E, D, R)).astype(np.float32),
        "experts_b": jnp.asarray(rng.normal(size=(n, E, R, OUT)), jnp.bfloat16),
        "token_proj": rng.normal(size=(n, D, R)).astype(np.float32),
    }
    held = rng.uniform(size=(n, E)) < 0.5
    held[:, 0] = False  # nobody holds expert 0: every client keeps its own copy
    held[:, 1] = True
    holders = {"experts_a": held, "experts_b": held, "token_proj": np.ones(n, bool)}
    out = jax.jit(holder_average)(tree, holders)
    for name in ("experts_a", "experts_b"):
        x = np.asarray(tree[name], np.float64)
        want = x.copy()
        for e in range(E):
            who = [c for c in range(n) if held[c, e]]
            if who:
                want[:, e] = sum(x[c, e] for c in who) / len(who)
        tol = 1e-2 if name == "experts_b" else 1e-6
        np.testing.assert_allclose(np.asarray(out[name], np.float64), want, rtol=tol, atol=tol)
        assert out[name].dtype == tree[name].dtype
    mean = np.asarray(tree["token_proj"], np.float64).mean(0)
    np.testing.assert_allclose(out["token_proj"], np.stack([mean] * n), rtol=1e-6, atol=1e-6)


class _EmbedProj(nnx.Module):
    """tokens -> embedding -> a projection holding an AMoLE (its input is the embedding row)."""

    def __init__(self, vocab: int):
        self.embed = Embed(vocab, D)
        self.proj = Linear(D, OUT, use_bias=False)

    def __call__(self, tokens, rngs=None):
        return self.proj(self.embed(tokens), rngs)


def test_client_stats_are_masked_token_means():
    vocab, rng = 11, np.random.default_rng(0)
    model = _EmbedProj(vocab)
    model.embed.weight.set_value(jnp.asarray(rng.normal(size=(vocab, D)), jnp.float32))
    amole.add_amole(model, CFG, key=jax.random.key(0))
    graphdef, params, base = lora.split(model)
    tokens = rng.integers(0, vocab, (4, 6))
    weights = (rng.uniform(size=(4, 6)) < 0.7).astype(np.float32)
    stats = jax.jit(amole.make_client_stats(graphdef, 2))(params, tokens, weights, base)
    token_means, key_means = stats["proj.lora"]
    x = np.asarray(model.embed.weight[...], np.float64)[tokens]  # [W, T, D]
    wsum = weights.sum()
    w_tok = np.asarray(model.proj.lora.token_proj[...], np.float64)
    a = np.asarray(model.proj.lora.experts_a[...], np.float64)
    want_t = np.einsum("wt,wtd,dr->r", weights, x, w_tok) / wsum
    want_u = np.einsum("wt,wtd,edr->er", weights, x, a) / wsum
    np.testing.assert_allclose(token_means, want_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(key_means, want_u, rtol=1e-5, atol=1e-6)


def test_embedding_noise_scale():
    """`ℓ ⊙ v'` with ℓ ~ Gamma(r, rate η), v' ~ U(-1, 1): E|noise| = r / (2η)."""
    stats = {"m": (jnp.zeros((8,)), jnp.zeros((20_000, 8)))}
    noisy = jax.jit(amole.add_noise)(jax.random.key(0), stats, 2.0)["m"]
    np.testing.assert_allclose(np.abs(noisy[1]).mean(), 8 / (2 * 2.0), rtol=0.03)
    np.testing.assert_allclose(np.abs(noisy[0]).mean(), 8 / (2 * 2.0), rtol=0.8)
    assert abs(float(noisy[1].mean())) < 0.05


# ---------------------------------------------------------------- end to end

N, POOL = 4, 5


@pytest.fixture(scope="module")
def problem() -> Problem:
    model = from_config(CONFIG, seed=0)
    cfg = amole.AMoLEConfig(targets=("c_attn.q", "c_attn.v"), num_experts=POOL, rank=4)
    amole.add_amole(model, cfg, key=jax.random.key(0))
    streams = client_streams(N)
    train = stack_streams(streams)
    val = stack_streams([s[::-1].copy() for s in streams])
    return Problem.create(
        model,
        train,
        {"val": eval_windows(val, SEQ, 4)},
        training=LocalTraining(steps=2, batch_size=2, seq_len=SEQ),
        optimizer=OptimizerConfig(name="adam", lr=1e-2, eps=1e-6),
        eval_batch_size=2,
        side={"aux": eval_windows(train, SEQ, 4)},
    )


OPTIONS = FedAMoLEOptions(clients_per_expert=2, min_experts=2, max_experts=3)


def check_masks(masks) -> dict[str, np.ndarray]:
    out = {p: np.asarray(v) for p, v in amole.by_module(masks).items()}
    for held in out.values():
        chex.assert_shape(held, (N, POOL))
        assert np.all(held.sum(0) == 2) and np.all((held.sum(1) >= 2) & (held.sum(1) <= 3))
    return out


def test_fedamole_rounds(problem):
    algo = METHODS["fedamole"](problem, OPTIONS)
    sim = algo.init(jax.random.key(0))
    check_masks(sim.clients.frozen)
    for _ in range(2):
        masks = check_masks(sim.clients.frozen)
        sim, metrics = algo.round(sim)
        assert np.all(np.isfinite(metrics["train"]["train_loss"]))
        held = np.mean([m.sum(1) for m in masks.values()], axis=0)
        np.testing.assert_allclose(metrics["aggregation"]["experts_held"], held)
        # After aggregation every client holds the same global pool.
        for leaf in jax.tree.leaves(sim.clients.params):
            np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
    check_masks(sim.clients.frozen)
    holders = amole.holders(sim.clients.params, sim.clients.frozen)
    for path, h in nnx.to_flat_state(holders):
        want = (N, POOL) if path[-1] in ("experts_a", "experts_b") else (N,)
        chex.assert_shape(h.get_value(), want)
    assert int(sim.round) == 2
    # Round 2 ran with a fresh Adam state (count = its 2 steps) and the learning rate × 0.99.
    _, scale = sim.clients.opt_state
    np.testing.assert_allclose(scale.hyperparams["step_size"], np.full(N, 0.99), rtol=1e-6)
    np.testing.assert_array_equal(optax.tree_utils.tree_get(sim.clients.opt_state[0], "count"), 2)


def test_fedamole_r_keeps_the_round_0_architecture(problem):
    algo = METHODS["fedamole-r"](problem, OPTIONS)
    sim = algo.init(jax.random.key(0))
    first = check_masks(sim.clients.frozen)
    sim, _ = algo.round(sim)
    sim, _ = algo.round(sim)
    for path, held in check_masks(sim.clients.frozen).items():
        np.testing.assert_array_equal(held, first[path])


def test_fedamole_validates_options(problem):
    with pytest.raises(ValueError, match="exceeds E·clients_per_expert"):
        fedamole(problem, FedAMoLEOptions(clients_per_expert=1, min_experts=2))
    with pytest.raises(ValueError, match="below the router's top_k"):
        fedamole(problem, FedAMoLEOptions(min_experts=1, max_experts=3))
    with pytest.raises(ValueError, match="auxiliary data"):
        fedamole(problem, FedAMoLEOptions(max_experts=3, aux_set="missing"))
