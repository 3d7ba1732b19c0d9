"""Soft prompts (prompt tuning, P-tuning) and the FedPrompt / FedPTuning baselines."""

from __future__ import annotations

import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import CONFIG, SEQ, tiny_problem

from fedjax_lora import lora
from fedjax_lora.aggregation import local_aggregator
from fedjax_lora.algorithms import federated
from fedjax_lora.algorithms.prompt_baselines import (
    FedPromptOptions,
    FedPTuningOptions,
    fedprompt_ft,
    fedptuning,
    reference_state_dict_aggregator,
    with_prompt,
)
from fedjax_lora.cli import main
from fedjax_lora.engine.batches import Batch
from fedjax_lora.engine.loss import lm_loss
from fedjax_lora.engine.state import init_clients
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.factory import from_config
from fedjax_lora.models.layers import rope_inverse_frequencies
from fedjax_lora.prompt_tuning import (
    PromptTuningConfig,
    PTuningConfig,
    attach_prompt,
    detach_prompt,
)

LLAMA = ModelConfig(
    family="llama",
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=48,
    max_positions=64,
    activation="silu",
    tie_embeddings=False,
    norm_eps=1e-6,
)
GPT2 = dataclasses.replace(CONFIG, n_layers=2)
FAMILIES = {"gpt2": GPT2, "llama": LLAMA}
B, T = 2, 7


def _model(cfg: ModelConfig, seed: int = 0):
    model = from_config(cfg, seed=seed)
    # Random (non-zero) biases and norm weights, so a wrong position or prefix shows.
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), state)
    nnx.update(model, state)
    return model


def _tokens(seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (B, T)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, tokens, kw):
    return nnx.merge(graphdef, state)(tokens, **kw)


def _forward(model, tokens, **kw) -> np.ndarray:
    return np.asarray(_jit_forward(*nnx.split(model), tokens, kw))


@nnx.jit
def _manual(model, prefix: jax.Array, tokens, positions, mask) -> jax.Array:
    """Independent path: concatenate `[prefix; E[tokens]]` by hand, run the backbone's blocks on
    these embeddings at the given (already shifted) positions and mask, apply the head, and drop
    the prefix outputs (no use of the model's prompt hook)."""
    cfg = model.config
    table = model.embedding().weight[...]
    x = jnp.concatenate([jnp.broadcast_to(prefix, (B, *prefix.shape)), table[tokens]], 1)
    if cfg.family == "gpt2":
        tr = model.transformer
        x = x + tr.wpe(positions)
        for block in tr.h:
            x, _ = block(x, mask, None)
        h = tr.ln_f(x)
    else:
        inv = rope_inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
        for layer in model.model.layers:
            x, _ = layer(x, positions, inv, mask, None)
        h = model.model.norm(x)
    head = table.T if cfg.tie_embeddings else model.lm_head.kernel[...]
    return (h @ head)[:, prefix.shape[0] :]


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_length_prompt_is_the_base(family):
    model = _model(FAMILIES[family])
    tokens = _tokens()
    base = _forward(model, tokens)
    attach_prompt(model, PromptTuningConfig(num_virtual_tokens=0))
    assert model.num_virtual_tokens() == 0
    np.testing.assert_array_equal(_forward(model, tokens), base)
    detach_prompt(model)
    assert getattr(model, "prompt", None) is None
    np.testing.assert_array_equal(_forward(model, tokens), base)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("given", ["defaults", "positions_and_mask"])
def test_prefix_logits_match_the_embedding_path(family, given):
    model = _model(FAMILIES[family])
    p = 3
    attach_prompt(model, PromptTuningConfig(num_virtual_tokens=p), key=jax.random.key(1))
    prefix = np.asarray(model.prompt.embedding[...])
    assert np.std(prefix) > 0.5  # N(0, 1), PEFT's RANDOM init
    tokens = _tokens(1)
    kw, positions, mask = {}, np.arange(p + T)[None].repeat(B, 0), None
    if given == "positions_and_mask":
        pos = np.array([np.arange(T), np.arange(T) + 4])
        valid = np.ones((B, T), np.int32)
        valid[1, -2:] = 0  # right padding on client row 1
        kw = {"positions": jnp.asarray(pos), "attention_mask": jnp.asarray(valid)}
        positions = np.concatenate([np.arange(p)[None].repeat(B, 0), pos + p], 1)
        mask = jnp.asarray(np.concatenate([np.ones((B, p), np.int32), valid], 1))
    got = _forward(model, tokens, **kw)
    chex.assert_shape(got, (B, T, 64))
    want = _manual(model, prefix, tokens, jnp.asarray(positions), mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_prompt_equals_prepending_the_text_tokens(family):
    """A prompt initialised from token ids (PEFT `TEXT`: ids repeated to fill P) is exactly the
    base model run on `[ids; tokens]`, prefix outputs dropped."""
    model = _model(FAMILIES[family])
    tokens = _tokens(2)
    ids = np.array([5, 9, 5, 9, 5])
    prepended = jnp.asarray(np.concatenate([np.broadcast_to(ids, (B, 5)), tokens], 1))
    want = _forward(model, prepended)[:, 5:]
    attach_prompt(
        model, PromptTuningConfig(num_virtual_tokens=5, init="text", init_token_ids=(5, 9))
    )
    np.testing.assert_allclose(_forward(model, tokens), want, rtol=1e-5, atol=1e-5)


def test_text_length_and_vocab_init_are_shared_token_embeddings():
    model = _model(GPT2)
    table = np.asarray(model.embedding().weight[...])
    cfg = PromptTuningConfig(num_virtual_tokens=None, init="text", init_token_ids=(3, 1, 4, 1))
    assert attach_prompt(model, cfg) == 4
    np.testing.assert_array_equal(model.prompt.embedding[...], table[[3, 1, 4, 1]])
    attach_prompt(model, PromptTuningConfig(num_virtual_tokens=6, init="vocab"))
    rows = np.asarray(model.prompt.embedding[...])
    for row in rows:  # every row is some token's embedding
        assert np.min(np.abs(table - row).max(1)) == 0
    # Fixed inits are the same for every client, even with per-client draws.
    _, template, _ = lora.split(model)
    clients = init_clients(template, _sgd(), 3, jax.random.key(0), shared_init=False)
    stacked = np.asarray(clients.params["prompt"]["embedding"][...])
    np.testing.assert_array_equal(stacked, np.broadcast_to(rows, (3, *rows.shape)))


def _sgd():
    import optax

    return optax.sgd(0.1)


def test_prompt_configs_are_validated():
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTuningConfig(init="text")
    with pytest.raises(ValueError, match="needs init='text'"):
        PromptTuningConfig(num_virtual_tokens=None)
    with pytest.raises(ValueError, match="encoder"):
        PTuningConfig(encoder="gru")
    with pytest.raises(ValueError, match="vocabulary"):
        attach_prompt(_model(GPT2), PromptTuningConfig(init="text", init_token_ids=(70,)))


# ------------------------------------------------------------------ P-tuning encoder


def _np_dense(layer, x):
    return x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])


def _np_lstm(direction, x):
    """PyTorch's LSTM recurrence (gates i, f, g, o), one direction, as a NumPy loop."""
    w_ih, w_hh = np.asarray(direction.w_ih[...]), np.asarray(direction.w_hh[...])
    bias = np.asarray(direction.b_ih[...]) + np.asarray(direction.b_hh[...])
    h = c = np.zeros(w_hh.shape[0])
    sig = lambda z: 1 / (1 + np.exp(-z))
    out = []
    for xt in x:
        i, f, g, o = np.split(xt @ w_ih + h @ w_hh + bias, 4)
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        out.append(h)
    return np.stack(out)


def numpy_encoder(encoder) -> np.ndarray:
    x = np.asarray(encoder.embedding[...], np.float64)
    if encoder.lstm_head is not None:
        for forward, backward in encoder.lstm_head:
            x = np.concatenate([_np_lstm(forward, x), _np_lstm(backward, x[::-1])[::-1]], -1)
    layers = list(encoder.mlp_head)
    for layer in layers[:-1]:
        x = np.maximum(_np_dense(layer, x), 0)
    return _np_dense(layers[-1], x)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_encoder_matches_numpy_and_trains_only_prompt_params(encoder):
    model = _model(GPT2)
    cfg = PTuningConfig(num_virtual_tokens=4, encoder=encoder, hidden_size=12, num_layers=2)
    attach_prompt(model, cfg, key=jax.random.key(3))
    out = np.asarray(model.prompt())
    chex.assert_shape(out, (4, GPT2.d_model))
    np.testing.assert_allclose(out, numpy_encoder(model.prompt), rtol=1e-5, atol=1e-5)
    # PyTorch init bounds: nn.Linear U(±1/sqrt(in)), nn.LSTM U(±1/sqrt(h)), nn.Embedding N(0, 1).
    first = model.prompt.mlp_head[0].kernel[...]
    assert np.abs(first).max() <= 1 / np.sqrt(first.shape[0])
    if encoder == "lstm":
        assert np.abs(model.prompt.lstm_head[1][0].w_ih[...]).max() <= 1 / np.sqrt(12)

    graphdef, params, base = lora.split(model)
    paths = [p for p, _ in nnx.to_flat_state(params)]
    assert paths and all(p[0] == "prompt" for p in paths)
    windows = _tokens(4)
    batch = Batch(windows[:, :-1], windows[:, 1:], jnp.ones((B, T - 1)))
    grads = jax.jit(jax.grad(lambda p: lm_loss(graphdef, p, base, batch, None)[0]))(params)
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g.get_value())
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path


# ------------------------------------------------------------------ the baselines


N = 4
PROMPT = PromptTuningConfig(num_virtual_tokens=4, init="vocab")
PTUNE = PTuningConfig(num_virtual_tokens=3, hidden_size=16)


@pytest.fixture(scope="module")
def problem():
    return tiny_problem(N, steps=2)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_fedprompt_ft_averages_the_local_prompts_and_reports_them(problem):
    """Against local training from the same start: after the round every client holds the NumPy
    mean of the local prompts, and the -FT metrics are the local prompts' metrics."""
    key = jax.random.key(0)
    local = federated("local", with_prompt(problem, PROMPT), local_aggregator(), shared_init=True)
    sim_local, m_local = local.round(local.init(key))
    algo = fedprompt_ft(problem, FedPromptOptions(PROMPT))
    sim, metrics = algo.round(algo.init(key))
    (trained,) = _leaves(sim_local.clients.params)
    chex.assert_shape(trained, (N, 4, CONFIG.d_model))
    mean = trained.mean(0)
    assert not np.allclose(trained, mean)  # clients trained on different data
    (got,) = _leaves(sim.clients.params)
    np.testing.assert_allclose(got, np.broadcast_to(mean, got.shape), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics["val"]["loss"], m_local["val"]["loss"], rtol=1e-6)


def test_fedptuning_averages_table_and_encoder(problem):
    key = jax.random.key(1)
    local = federated("local", with_prompt(problem, PTUNE), local_aggregator(), shared_init=True)
    sim_local, _ = local.round(local.init(key))
    algo = fedptuning(problem, FedPTuningOptions(PTUNE))
    sim, metrics = algo.round(algo.init(key))
    for got, trained in zip(
        _leaves(sim.clients.params), _leaves(sim_local.clients.params), strict=True
    ):
        want = np.broadcast_to(trained.mean(0), trained.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(metrics["val"]["loss"]))


def test_reference_state_dict_averages_encoder_outputs_into_the_table():
    model = _model(GPT2)
    attach_prompt(model, PTuningConfig(num_virtual_tokens=3, hidden_size=8))
    _, template, _ = lora.split(model)
    stacked = init_clients(template, _sgd(), 3, jax.random.key(5), shared_init=False).params
    agg = reference_state_dict_aggregator(nnx.graphdef(model.prompt))
    out, _ = jax.jit(agg.apply)(stacked, agg.init(stacked))
    outputs = []
    for c in range(3):
        nnx.update(model, jax.tree.map(lambda x, c=c: x[c], stacked))
        outputs.append(numpy_encoder(model.prompt))
    table = np.asarray(out["prompt"]["embedding"][...])
    np.testing.assert_allclose(table, np.broadcast_to(np.mean(outputs, 0), table.shape), atol=1e-5)
    before = dict(nnx.to_flat_state(stacked))
    for path, var in nnx.to_flat_state(out):
        if path[-1] != "embedding":
            x = np.asarray(before[path].get_value())
            want = np.broadcast_to(x.mean(0), x.shape)
            np.testing.assert_allclose(var.get_value(), want, rtol=1e-5, atol=1e-7)


def test_with_prompt_checks_the_context(problem):
    too_long = PromptTuningConfig(num_virtual_tokens=CONFIG.max_positions - SEQ + 1)
    with pytest.raises(ValueError, match="exceed the model's context"):
        with_prompt(problem, too_long)
    with pytest.raises(ValueError, match="PTuningConfig"):
        fedptuning(problem, FedPTuningOptions(PROMPT))


def test_prompt_methods_run_through_the_demo(tmp_path):
    methods = ["fedprompt", "fedprompt-ft", "fedptuning", "fedptuning-ft"]
    overrides = [
        "model.d_model=32",
        "model.d_ff=64",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.vocab_size=64",
        "model.max_positions=40",
        "data.tokens_per_client=600",
        "training.steps=2",
        "training.batch_size=4",
        "training.seq_len=16",
        "eval.max_windows=4",
        "eval.batch_size=4",
    ]
    argv = ["demo", "--rounds", "1", "--methods", *methods, "--out", str(tmp_path)]
    assert main([*argv, "--no-progress", "--set", *overrides]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in records] == [(m, r) for m in methods for r in (0, 1)]
    assert all(np.isfinite(r["val_mean_loss"]) for r in records)
