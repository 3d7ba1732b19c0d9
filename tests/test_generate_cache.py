"""Greedy decoding with the key/value cache against full-forward decoding and against a per-row
NumPy argmax loop over unpadded prompts, for GPT-2 and Llama, bare and with LoRA / AMoLE
adapters, on left-padded batches; EOS stopping; the attention cache primitives."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lora import amole, lora, models
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.factory import from_config
from fedjax_lora.models.generate import greedy_decode
from fedjax_lora.models.layers import KVCache, causal_attention

VOCAB = 48
CONFIGS = {
    "gpt2": ModelConfig(
        family="gpt2",
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_positions=32,
    ),
    "llama": ModelConfig(
        family="llama",
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_positions=32,
        tie_embeddings=False,
        activation="silu",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


def randomized(model: nnx.Module, seed: int) -> nnx.Module:
    """Every weight and adapter redrawn (norm scales near 1, embeddings N(0, 1), matrices
    N(0, 2/fan_in), biases small), so greedy outputs vary from step to step."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Any(nnx.Param, lora.Adapter))

    def draw(path, x):
        names = [str(p.key) for p in path if hasattr(p, "key")]
        z = rng.normal(size=x.shape)
        if any(n.startswith(("ln", "norm")) or n.endswith("layernorm") for n in names):
            z = 1.0 + 0.1 * z if names[-1] == "weight" else 0.1 * z
        elif names[-1] == "bias":
            z = 0.1 * z
        elif x.ndim >= 2 and names[-1] != "weight":  # (…, in, out) kernels and adapter factors
            z = z * np.sqrt(2.0 / x.shape[-2])
        return jnp.asarray(z, x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(draw, state))
    return model


def build(family: str, adapter: str) -> nnx.Module:
    model = from_config(CONFIGS[family], seed=0)
    qv = ("c_attn.q", "c_attn.v") if family == "gpt2" else ("q_proj", "v_proj")
    if adapter == "lora":
        lora.add_lora(model, lora.LoRAConfig(targets=qv, rank=4, alpha=8.0))
    elif adapter == "amole":
        amole.add_amole(
            model, amole.AMoLEConfig(targets=qv, num_experts=4, rank=2, alpha=4.0, dropout=0.0)
        )
    model = randomized(model, seed=0)
    if adapter == "amole":  # a partial expert set per module
        for _, m in nnx.iter_graph(model):
            if isinstance(m, amole.AMoLE):
                m.held.set_value(jnp.asarray([True, False, True, True]))
    return model


def numpy_greedy(model: nnx.Module, prompts: list[list[int]], steps: int, eos: int | None = None):
    """Reference: per prompt, the unpadded prompt and the tokens so far, one full forward per
    step, NumPy argmax of the last real position's logits; after EOS every token is EOS. (The
    sequence sits at the start of a fixed zero buffer, so one compiled forward serves every
    step: causal attention keeps later slots out of earlier logits.)"""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    outs = []
    for prompt in prompts:
        seq, out = list(prompt), []
        for _ in range(steps):
            if out and eos is not None and out[-1] == eos:
                out.append(eos)
                continue
            buffer = np.zeros((1, model.config.max_positions), np.int32)
            buffer[0, : len(seq)] = seq
            logits = np.asarray(forward(state, buffer))[0, len(seq) - 1]
            out.append(int(np.argmax(logits)))
            seq.append(out[-1])
        outs.append(out)
    return outs


LENGTHS = (7, 3, 5)  # left-padded to 7


def padded_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, VOCAB, n).tolist() for n in LENGTHS]
    width = max(LENGTHS)
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :], mask[i, width - len(p) :] = p, True
    return prompts, tokens, mask


@pytest.mark.parametrize("adapter", ["none", "lora", "amole"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_equals_full_forward_and_numpy_reference(family, adapter):
    model = build(family, adapter)
    prompts, tokens, mask = padded_batch()
    steps = 8
    cached = models.generate(model, tokens, steps, prompt_mask=mask, use_cache=True)
    full = models.generate(model, tokens, steps, prompt_mask=mask, use_cache=False)
    chex.assert_shape(cached, (len(prompts), tokens.shape[1] + steps))
    np.testing.assert_array_equal(cached[:, : tokens.shape[1]], tokens)
    np.testing.assert_array_equal(cached, full)
    assert np.asarray(cached[:, tokens.shape[1] :]).tolist() == numpy_greedy(model, prompts, steps)
    # The outputs are not degenerate (the comparison would then be vacuous).
    assert len(set(np.asarray(cached[:, tokens.shape[1] :]).ravel().tolist())) > 3


def test_eos_stops_rows_and_padding_rows_are_finished():
    model = build("llama", "lora")
    prompts, tokens, mask = padded_batch(1)
    free = np.asarray(models.generate(model, tokens, 8, prompt_mask=mask))[:, tokens.shape[1] :]
    eos = int(free[0, 2])  # row 0 emits it at step 2 (maybe earlier)
    tokens = np.concatenate([tokens, np.zeros((1, tokens.shape[1]), np.int32)])
    mask = np.concatenate([mask, np.zeros((1, mask.shape[1]), bool)])  # a padding example
    reference = numpy_greedy(model, prompts, 8, eos=eos)
    for use_cache in (True, False):
        out = jax.jit(
            lambda t, m, use_cache=use_cache: greedy_decode(
                model, t, m, 8, eos_id=eos, use_cache=use_cache
            )
        )(tokens, mask)
        out = np.asarray(out)
        assert out[: len(prompts)].tolist() == reference
        assert np.all(out[0, 2:] == eos)
        assert np.all(out[-1] == eos)


def test_errors():
    model = build("gpt2", "none")
    with pytest.raises(ValueError, match="positions"):
        models.generate(model, np.ones((1, 30), np.int32), 8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        models.generate(model, np.ones((1, 3), np.int32), 0)


def test_kv_cache_write_and_offset_attention():
    """Attention of the last query over a cache holding all keys equals the last row of the
    full causal attention (NumPy softmax reference)."""
    rng = np.random.default_rng(3)
    b, t, h, kv, dh = 2, 5, 4, 2, 8
    q = rng.normal(size=(b, t, h, dh)).astype(np.float32)
    k = rng.normal(size=(b, t, kv, dh)).astype(np.float32)
    v = rng.normal(size=(b, t, kv, dh)).astype(np.float32)
    key_mask = np.ones((b, t + 3), bool)
    key_mask[1, 0] = False
    cache = KVCache.zeros(b, t + 3, kv, dh, jnp.float32).write(k[:, :-1], v[:, :-1])
    assert int(cache.index) == t - 1
    cache = cache.write(k[:, -1:], v[:, -1:])
    np.testing.assert_array_equal(cache.k[:, :t], k)
    np.testing.assert_array_equal(cache.k[:, t:], 0)
    got = causal_attention(
        jnp.asarray(q[:, -1:]), cache.k, cache.v, attention_mask=key_mask, query_offset=t - 1
    )
    for i in range(b):
        for head in range(h):
            g = head // (h // kv)
            keep = key_mask[i, :t]
            s = q[i, -1, head] @ k[i, keep, g].T / np.sqrt(dh)
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(got[i, 0, head], p @ v[i, keep, g], rtol=1e-5, atol=1e-5)
