"""Scale settings against independent references: chunked cross-entropy (NumPy), block
rematerialisation (same gradients, less memory), and client cohorts (full participation, idle
clients untouched, FedAvg over the cohort, optimizer-state semantics, sampling frequencies, exact
resume)."""

from __future__ import annotations

import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_lora import config as config_lib
from fedjax_lora import lora
from fedjax_lora.aggregation import local_aggregator
from fedjax_lora.algorithms import (
    Capabilities,
    Method,
    aggregating,
    build,
    fedavg,
    federated,
    local,
    standard_client,
)
from fedjax_lora.algorithms.lora_baselines import fedsa_lora
from fedjax_lora.checkpoint import _from_saved, _to_saveable
from fedjax_lora.engine import LocalTraining, lm_loss
from fedjax_lora.engine.batches import Batch
from fedjax_lora.engine.cohort import Cohort
from fedjax_lora.engine.loss import chunked_token_cross_entropy
from fedjax_lora.lora import Adapter, Init
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.factory import from_config
from tests.tiny import CONFIG, VOCAB, tiny_problem


def leaves(tree):
    def plain(x):
        return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    return [np.asarray(plain(x)) for x in jax.tree.leaves(tree)]


def rows(tree, idx):
    return [x[np.asarray(idx)] for x in leaves(tree)]


def assert_trees_close(a, b, atol=1e-6):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol)


# ------------------------------------------------------------------ chunked cross-entropy, remat


def numpy_cross_entropy(logits, targets):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("chunk", [1, 7, 24, 64, 1000])
def test_chunked_cross_entropy_matches_numpy(chunk):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (3, 8, 16))
    weight = jax.random.normal(k2, (16, 500)) * 0.5
    targets = jax.random.randint(k3, (3, 8), 0, 500)
    got = chunked_token_cross_entropy(lambda h: h @ weight, hidden, targets, chunk)
    chex.assert_shape(got, (3, 8))
    logits = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64)
    np.testing.assert_allclose(got, numpy_cross_entropy(logits, np.asarray(targets)), atol=1e-5)

    # gradients with respect to the head weight and the hidden states equal the unchunked ones
    def loss(w, h, c):
        if c is None:
            return optax.softmax_cross_entropy_with_integer_labels(h @ w, targets).mean()
        return chunked_token_cross_entropy(lambda x: x @ w, h, targets, c).mean()

    full = jax.grad(loss, argnums=(0, 1))(weight, hidden, None)
    chunked = jax.grad(loss, argnums=(0, 1))(weight, hidden, chunk)
    assert_trees_close(full, chunked, atol=1e-5)


def _batch(b=4, t=16, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, VOCAB)
    weights = (jnp.arange(t) % 5 != 0).astype(jnp.float32) * jnp.ones((b, 1))
    return Batch(tokens[:, :-1], tokens[:, 1:], weights)


class _Sow(nnx.Module):
    """An adapter that sows an auxiliary loss (as a mixture's load balancing does)."""

    def __init__(self, width):
        self.a = Adapter(jnp.full((width,), 0.5), init=Init("zeros"))

    def __call__(self, x, rngs=None):
        self.sow(nnx.Intermediate, "aux_loss", 0.1 * jnp.sum(self.a[...] ** 2))
        return x[..., : self.a.shape[0]] * self.a[...]


def _dropout_model():
    cfg = dataclasses.replace(CONFIG, n_layers=2, dropout=0.2, attn_dropout=0.2)
    model = from_config(cfg)
    lora.add_lora(
        model, lora.LoRAConfig(targets=("c_attn.q", "c_attn.v"), rank=4, alpha=8.0, dropout=0.1)
    )
    for block in model.transformer.h:
        block.mlp.c_proj.lora = _Sow(cfg.d_model)
    return model


def test_lm_loss_with_ce_chunk_equals_numpy_on_the_model_logits():
    model = _dropout_model()
    graphdef, adapters, base = lora.split(model)
    batch = _batch()
    logits, _ = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(model, batch.inputs)
    logits = np.asarray(logits, np.float64)
    ce = numpy_cross_entropy(logits, np.asarray(batch.targets))
    w = np.asarray(batch.weights)
    expected = (ce * w).sum() / w.sum()
    for chunk in (None, 5, 16):
        _, parts = lm_loss(graphdef, adapters, base, batch, None, ce_chunk=chunk)
        np.testing.assert_allclose(parts["ce"], expected, atol=1e-5, err_msg=f"chunk {chunk}")


def test_remat_and_ce_chunk_give_the_same_loss_and_gradients_with_dropout_and_aux_losses():
    graphdef, adapters, base = lora.split(_dropout_model())
    batch = _batch()

    def run(**kw):
        fn = jax.value_and_grad(
            lambda p: lm_loss(graphdef, p, base, batch, jax.random.key(3), **kw), has_aux=True
        )
        return jax.jit(fn)(adapters)

    (loss, parts), grads = run()
    assert float(parts["aux"]) > 0 and float(parts["ce"]) > 0
    for kw in ({"remat": True}, {"ce_chunk": 9}, {"remat": True, "ce_chunk": 9}):
        (loss2, parts2), grads2 = run(**kw)
        np.testing.assert_allclose(loss2, loss, rtol=1e-6, err_msg=str(kw))
        np.testing.assert_allclose(parts2["aux"], parts["aux"], rtol=1e-6)
        assert_trees_close(grads2, grads, atol=1e-6)


def test_ce_chunk_and_remat_lower_the_compiled_peak_memory():
    """The compiled gradient's temporary buffers: chunking the head saves at least one full
    `[B, T, V]` logits buffer; rematerialising blocks saves activations."""
    cfg = ModelConfig(
        family="gpt2",
        vocab_size=1000,
        d_model=32,
        n_layers=4,
        n_heads=2,
        d_ff=128,
        max_positions=32,
    )
    model = from_config(cfg)
    lora.add_lora(model, lora.LoRAConfig(targets=("c_attn.q", "c_attn.v"), rank=4))
    graphdef, adapters, base = lora.split(model)
    tokens = jnp.zeros((16, 33), jnp.int32)
    batch = Batch(tokens[:, :-1], tokens[:, 1:], jnp.ones((16, 32)))

    def temp_bytes(**kw):
        fn = jax.grad(lambda p: lm_loss(graphdef, p, base, batch, None, **kw)[0])
        return jax.jit(fn).lower(adapters).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 16 * 32 * cfg.vocab_size * 4
    full = temp_bytes()
    assert full - temp_bytes(ce_chunk=64) >= logits_bytes
    assert temp_bytes(remat=True) < full


def test_memory_settings_come_from_the_config_and_keep_the_round_numbers():
    config = config_lib.load(None, ["training.remat=true", "training.ce_chunk=10"])
    assert config.training.remat is True and config.training.ce_chunk == 10
    with pytest.raises(ValueError, match="ce_chunk"):
        config_lib.load(None, ["training.ce_chunk=0"])

    problem = tiny_problem(num_clients=2)
    ref_sim, ref_metrics = local(problem).round(local(problem).init(jax.random.key(0)))
    training = dataclasses.replace(problem.training, remat=True, ce_chunk=10)
    algo = local(dataclasses.replace(problem, training=training))
    sim, metrics = algo.round(algo.init(jax.random.key(0)))
    assert_trees_close(sim.clients.params, ref_sim.clients.params, atol=1e-5)
    np.testing.assert_allclose(
        metrics["train"]["train_loss"], ref_metrics["train"]["train_loss"], rtol=1e-5
    )


# ------------------------------------------------------------------------------------- cohorts


def _with_cohort(problem, size, sampling="uniform", optimizer="keep"):
    return dataclasses.replace(problem, cohort=Cohort(size, sampling, optimizer))


@pytest.mark.parametrize("method", [local, fedavg], ids=["local", "fedavg"])
def test_a_cohort_of_every_client_equals_full_participation(method):
    problem = tiny_problem(num_clients=4)
    full = method(problem)
    sampled = method(_with_cohort(problem, 4))
    a, b = full.init(jax.random.key(1)), sampled.init(jax.random.key(1))
    for _ in range(2):
        a, ma = full.round(a)
        b, mb = sampled.round(b)
        np.testing.assert_array_equal(mb["train"]["cohort"], np.arange(4))
        assert_trees_close(a.clients, b.clients, atol=1e-6)
        np.testing.assert_allclose(ma["val"]["ppl"], mb["val"]["ppl"], rtol=1e-6)


def test_only_the_drawn_clients_change_and_they_train_as_in_full_participation():
    problem = tiny_problem(num_clients=6)
    full = local(problem)
    cohort = local(_with_cohort(problem, 2))
    start = full.init(jax.random.key(2))
    trained, _ = full.round(start)
    sim, metrics = cohort.round(cohort.init(jax.random.key(2)))
    idx = np.asarray(metrics["train"]["cohort"])
    idle = np.setdiff1d(np.arange(6), idx)
    assert idx.shape == (2,) and len(set(idx.tolist())) == 2
    chex.assert_shape(metrics["train"]["train_loss"], (2, problem.training.steps))
    chex.assert_shape(metrics["val"]["ppl"], (6,))  # evaluation covers the population
    for got, want in zip(rows(sim.clients, idx), rows(trained.clients, idx), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    for got, want in zip(rows(sim.clients, idle), rows(start.clients, idle), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(sim.clients.step)[idle], 0)


def test_fedavg_over_a_cohort_averages_the_drawn_clients_and_broadcasts_the_server_model():
    problem = _with_cohort(tiny_problem(num_clients=6), 3)
    plain = federated("plain", problem, local_aggregator(), shared_init=True)
    averaged = fedavg(problem)
    key = jax.random.key(3)
    local_sim, local_metrics = plain.round(plain.init(key))
    start = averaged.init(key)
    sim, metrics = averaged.round(start)
    idx = np.asarray(metrics["train"]["cohort"])
    np.testing.assert_array_equal(idx, local_metrics["train"]["cohort"])
    for trained, mixed in zip(
        rows(local_sim.clients.params, idx), leaves(sim.clients.params), strict=True
    ):
        mean = trained.astype(np.float64).mean(axis=0)
        for c in range(6):  # drawn and idle clients alike hold the new server model
            np.testing.assert_allclose(mixed[c], mean, atol=1e-6)
    idle = np.setdiff1d(np.arange(6), idx)
    for got, want in zip(
        rows(sim.clients.opt_state, idle), rows(start.clients.opt_state, idle), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_fedsa_lora_over_a_cohort_sends_its_global_a_to_the_idle_clients():
    # A client downloads the current global part when it is drawn again: after the round every
    # client holds the cohort's mean A; B stays each client's own (idle: untouched).
    problem = _with_cohort(tiny_problem(num_clients=6), 3)
    plain = federated("plain", problem, local_aggregator(), shared_init=True)
    selective = fedsa_lora(problem)
    key = jax.random.key(3)
    local_sim, local_metrics = plain.round(plain.init(key))
    start = selective.init(key)
    sim, metrics = selective.round(start)
    idx = np.asarray(metrics["train"]["cohort"])
    np.testing.assert_array_equal(idx, local_metrics["train"]["cohort"])
    idle = np.setdiff1d(np.arange(6), idx)
    named = lambda tree: {jax.tree_util.keystr(p): np.asarray(x) for p, x in _paths(tree)}
    trained, got, before = (named(t.clients.params) for t in (local_sim, sim, start))
    global_a = [k for k in got if k.endswith("['a'].value")]
    assert global_a and len(global_a) < len(got)
    for key_, value in got.items():
        if key_ in global_a:  # global: everyone holds the cohort's mean
            mean = trained[key_][idx].astype(np.float64).mean(axis=0)
            for c in range(6):
                np.testing.assert_allclose(value[c], mean, atol=1e-6)
        else:  # local B: drawn clients their trained B, idle clients their own
            np.testing.assert_allclose(value[idx], trained[key_][idx], atol=1e-6)
            np.testing.assert_array_equal(value[idle], before[key_][idle])


def _paths(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def _adam_counts(sim):
    counts = [
        np.asarray(x)
        for path, x in jax.tree_util.tree_leaves_with_path(sim.clients.opt_state)
        if "count" in jax.tree_util.keystr(path)
    ]
    return counts[0]


def test_optimizer_state_is_kept_or_reset_between_participations():
    steps = 2
    base = tiny_problem(num_clients=4, steps=steps)
    counts, participations = {}, {}
    for mode in ("keep", "reset"):
        algo = local(_with_cohort(base, 2, optimizer=mode))
        sim = algo.init(jax.random.key(4))
        seen = np.zeros(4, int)
        for _ in range(4):
            sim, metrics = algo.round(sim)
            seen[np.asarray(metrics["train"]["cohort"])] += 1
        counts[mode], participations[mode] = _adam_counts(sim), seen
        np.testing.assert_array_equal(np.asarray(sim.clients.step), steps * seen)
    # keep: the optimizer's step count runs on over the client's participations
    np.testing.assert_array_equal(counts["keep"], steps * participations["keep"])
    # reset: a fresh optimizer state at every draw, so at most one round's steps
    np.testing.assert_array_equal(counts["reset"], steps * (participations["reset"] > 0))
    assert participations["reset"].max() > 1


def _draw(cohort, weights, trials):
    keys = jax.random.split(jax.random.key(5), trials)
    return np.asarray(jax.jit(jax.vmap(lambda k: cohort.sample(k, weights)))(keys))


def test_uniform_cohorts_are_distinct_sorted_and_equally_likely():
    draws = _draw(Cohort(3), jnp.ones(10), 4000)
    assert np.all(np.diff(draws, axis=1) > 0)  # sorted, without replacement
    freq = np.bincount(draws.ravel(), minlength=10) / 4000
    # inclusion probability K/P = 0.3; 4.5 binomial standard deviations
    np.testing.assert_allclose(freq, 0.3, atol=4.5 * np.sqrt(0.3 * 0.7 / 4000))


def test_token_weighted_cohorts_follow_successive_sampling_probabilities():
    w = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    p = w / w.sum()
    trials = 6000
    single = _draw(Cohort(1, "tokens"), jnp.asarray(w), trials)[:, 0]
    freq = np.bincount(single, minlength=5) / trials
    assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / trials)), (freq, p)
    # K = 2: inclusion probability of i = Σ over ordered pairs containing i of p_a p_b / (1 - p_a)
    inclusion = np.zeros(5)
    for a, b in itertools.permutations(range(5), 2):
        pr = p[a] * p[b] / (1 - p[a])
        inclusion[a] += pr
        inclusion[b] += pr
    pairs = _draw(Cohort(2, "tokens"), jnp.asarray(w), trials)
    assert np.all(pairs[:, 0] != pairs[:, 1])
    freq = np.bincount(pairs.ravel(), minlength=5) / trials
    sd = np.sqrt(inclusion * (1 - inclusion) / trials)
    assert np.all(np.abs(freq - inclusion) <= 4.5 * sd), (freq, inclusion)


def test_cohorts_resume_exactly_from_a_checkpoint():
    problem = _with_cohort(tiny_problem(num_clients=6), 2)
    algo = fedavg(problem)
    straight = algo.init(jax.random.key(6))
    cohorts = []
    for _ in range(3):
        straight, metrics = algo.round(straight)
        cohorts.append(np.asarray(metrics["train"]["cohort"]))
    assert len({tuple(c) for c in cohorts}) > 1  # the cohort changes over rounds

    sim, _ = algo.round(algo.init(jax.random.key(6)))
    # what a checkpoint holds (the flat arrays) restored into a fresh run's state
    resumed = _from_saved(_to_saveable(sim), algo.init(jax.random.key(99)))
    for r in (1, 2):
        resumed, metrics = algo.round(resumed)
        np.testing.assert_array_equal(metrics["train"]["cohort"], cohorts[r])
    assert_trees_close(resumed.clients, straight.clients, atol=0)


def test_cohort_configuration_is_validated():
    config = config_lib.load(
        None, ["data.cohort_size=2", "data.cohort_sampling=tokens", "data.cohort_optimizer=reset"]
    )
    assert config.data.cohort() == Cohort(2, "tokens", "reset")
    assert config_lib.load(None, []).data.cohort() is None
    with pytest.raises(ValueError, match="cohort_sampling"):
        config_lib.load(None, ["data.cohort_sampling=sizes"])
    with pytest.raises(ValueError, match="larger than the population"):
        Cohort(5).check(4)
    problem = _with_cohort(tiny_problem(num_clients=4), 2)
    no_cohorts = Method(
        "custom",
        standard_client(problem, shared_init=True),
        aggregating(local_aggregator()),
        capabilities=Capabilities(cohorts=False),
    )
    with pytest.raises(ValueError, match="does not support client cohorts"):
        build(problem, no_cohorts)
    assert isinstance(problem.training, LocalTraining)
