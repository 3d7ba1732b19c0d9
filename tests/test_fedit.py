"""FedIT / FedIT-FT against a NumPy reference of two rounds (one Adam step per round, the optimizer
re-created every round with the learning rate decayed 0.99 per round, A and B averaged
separately; FedIT evaluated on the global adapter, FedIT-FT on the local ones), the
`round_decay=None` variant against FedAvg, and the registry / config wiring."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_lora.algorithms import METHODS, Problem
from fedjax_lora.algorithms.fedit import FedITOptions, fedit, fedit_ft
from fedjax_lora.data.streams import eval_windows, stack_streams
from fedjax_lora.engine import LocalTraining, OptimizerConfig
from tests.tiny import SEQ, VOCAB, tiny_model

N, LR, EPS = 3, 0.05, 1e-4  # eps well above float32 gradient noise


def one_window_problem() -> Problem:
    """Every client's training and validation stream is exactly one window (SEQ + 1 tokens), so
    the local batch is known: one Adam step per round on that window."""
    rng = np.random.default_rng(0)
    train = [rng.integers(0, VOCAB, SEQ + 1).astype(np.int32) for _ in range(N)]
    val = [rng.integers(0, VOCAB, SEQ + 1).astype(np.int32) for _ in range(N)]
    return Problem.create(
        tiny_model(),
        stack_streams(train),
        {"val": eval_windows(stack_streams(val), SEQ, 1)},
        training=LocalTraining(steps=1, batch_size=2, seq_len=SEQ),
        optimizer=OptimizerConfig(name="adam", lr=LR, b1=0.9, b2=0.999, eps=EPS),
        eval_batch_size=1,
    )


def ce(problem: Problem, params, window: np.ndarray) -> jax.Array:
    model = nnx.merge(problem.graphdef, params, problem.base)
    logits = model(jnp.asarray(window[None, :-1]))
    return optax.softmax_cross_entropy_with_integer_labels(logits, window[None, 1:]).mean()


def test_two_rounds_match_numpy_reference():
    problem = one_window_problem()
    train = np.asarray(problem.train.tokens)[:, : SEQ + 1]
    val = np.asarray(problem.eval_sets["val"].windows)[:, 0]
    grad = jax.jit(jax.grad(lambda p, w: ce(problem, p, w)))
    loss = jax.jit(lambda p, w: ce(problem, p, w))

    algos = {"fedit": fedit(problem), "fedit-ft": fedit_ft(problem)}
    sims = {k: a.init(jax.random.key(1)) for k, a in algos.items()}
    params = sims["fedit"].clients.params
    for leaf in jax.tree.leaves(params):  # one shared initial draw
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
    theta = jax.tree.map(lambda x: np.asarray(x[0], np.float64), params)
    for r in (1, 2):
        scale = 0.99 ** (r - 1)
        local = []
        for c in range(N):
            g = grad(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), theta), train[c])
            # A fresh Adam's first step: m̂ = g, v̂ = g², update = -lr · g / (|g| + eps).
            step = lambda t, gr, s=scale: (
                t - LR * s * np.asarray(gr) / (np.abs(np.asarray(gr)) + EPS)
            )
            local.append(jax.tree.map(step, theta, g))
        theta = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *local)  # A and B separately
        metrics = {}
        for k, algo in algos.items():
            sims[k], metrics[k] = algo.round(sims[k])
        for k in algos:  # both keep the aggregated adapter, the same on every client
            chex.assert_trees_all_close(
                jax.tree.map(lambda x: x[1], sims[k].clients.params),
                jax.tree.map(lambda x: x.astype(np.float32), theta),
                rtol=1e-4,
                atol=1e-6,
            )
        f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
        global_loss = [float(loss(f32(theta), val[c])) for c in range(N)]
        local_loss = [float(loss(f32(local[c]), val[c])) for c in range(N)]
        np.testing.assert_allclose(metrics["fedit"]["val"]["loss"], global_loss, rtol=1e-4)
        np.testing.assert_allclose(metrics["fedit-ft"]["val"]["loss"], local_loss, rtol=1e-4)
        assert not np.allclose(global_loss, local_loss)


def test_without_round_decay_fedit_is_fedavg():
    problem = one_window_problem()
    a, b = fedit(problem, FedITOptions(round_decay=None)), METHODS["fedavg"](problem)
    sa, sb = a.init(jax.random.key(2)), b.init(jax.random.key(2))
    for _ in range(2):
        (sa, ma), (sb, mb) = a.round(sa), b.round(sb)
    chex.assert_trees_all_close(sa.clients.params, sb.clients.params)
    np.testing.assert_allclose(ma["val"]["loss"], mb["val"]["loss"])
    assert a.name == "fedit"


def test_registry_options_and_errors():
    from fedjax_lora import config as config_lib
    from fedjax_lora.experiment import method_factory

    assert METHODS["fedit"].factory is fedit and METHODS["fedit-ft"].factory is fedit_ft
    cfg = config_lib.load(None, ["method_options={fedit-ft: {round_decay: 0.5}}"])
    factory = method_factory("fedit-ft", cfg)
    assert factory.keywords == {"options": FedITOptions(round_decay=0.5)}
    assert factory(one_window_problem()).name == "fedit-ft"
    old = config_lib.load(None, ["method_options={fedit: {fine_tuned: true}}"])
    with pytest.raises(ValueError, match="method_options.fedit.fine_tuned is gone.*'fedit-ft'"):
        method_factory("fedit", old)
    old = config_lib.load(None, ["method_options={fedit: {options: {round_decay: 0.5}}}"])
    with pytest.raises(ValueError, match=r"write method_options.fedit.<option> instead"):
        method_factory("fedit", old)
    with pytest.raises(ValueError, match="round_decay"):
        FedITOptions(round_decay=1.5)
