"""The CoMiGS mixture block against per-token NumPy loops: gating (k = 1, k = 2, E = 1), a padded
client, the Llama variant, and the load-balancing loss with the generalist-importance factors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lora import lora
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.factory import from_config
from fedjax_lora.moe import MoEConfig, install_moe, load_balancing_loss, set_expert_counts

GPT2 = ModelConfig(
    family="gpt2", vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_positions=32
)
LLAMA = ModelConfig(
    family="llama",
    vocab_size=64,
    d_model=16,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    d_ff=24,
    max_positions=32,
    activation="silu",
)


# ---------------------------------------------------------------- NumPy references


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


def np_gate(z, k, num_real):
    """The reference `MoE.forward` for one token over the client's `num_real` experts."""
    z = np.asarray(z, np.float64)[:num_real]
    k = min(k, num_real)
    w = np.zeros(num_real)
    if num_real == 1:
        w[0] = 1.0
    elif k == 1:
        p = np_softmax(z)
        w[np.argmax(p)] = p.max()
    else:
        top = np.argsort(-z, kind="stable")[:k]
        w[top] = np_softmax(z[top])
    return w


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_expert(params, h, e, family, s):
    """Expert e as the full frozen MLP with its own LoRA on every projection."""

    def proj(name, x):
        p = params[name]
        y = x @ p["kernel"] + p.get("bias", 0.0)
        return y + s * (x @ p["a"][e]) @ p["b"][e]

    if family == "gpt2":
        return proj("c_proj", np_gelu(proj("c_fc", h)))
    return proj("down_proj", np_silu(proj("gate_proj", h)) * proj("up_proj", h))


def np_router_logits(params, h):
    z = h @ params["w"]
    return np.tanh(z) @ params["w_out"] if "w_out" in params else z


def np_moe(params, hs, k, num_real, family, s):
    out = np.zeros_like(hs)
    for t, h in enumerate(hs):
        w = np_gate(np_router_logits(params, h), k, num_real) if "w" in params else [1.0]
        for e, we in enumerate(w):
            if we:
                out[t] += we * np_expert(params, h, e, family, s)
    return out


def np_lb(logits, k, num_real, pi):
    """`get_load_balancing_loss` of the reference (torch code transcribed), over real experts."""
    z = np.asarray(logits, np.float64)[:, :num_real]
    e, k = num_real, min(k, num_real)
    select, mask = np.zeros_like(z), np.zeros_like(z)
    for t in range(len(z)):
        scores = np_softmax(z[t]) if k == 1 else z[t]
        top = np.argsort(-scores, kind="stable")[:k]
        scattered = np.zeros(e)
        scattered[top] = scores[top]
        select[t] = scattered if k == 1 else np_softmax(scattered)
        mask[t, top] = 1.0 / k
    factors = np.ones(e)
    if pi is not None:
        factors[1:] *= (e - 1) / (1 - pi)
        factors[0] /= pi
        factors /= e
    return (select.mean(0) * mask.mean(0) * factors).mean() * e**2


# ---------------------------------------------------------------- helpers


def moe_model(family_cfg, config, seed=0):
    model = from_config(family_cfg, seed=seed)
    targets = ("c_attn", "mlp.c_fc") if family_cfg.family == "gpt2" else ("q_proj",)
    lora.add_lora(model, lora.LoRAConfig(targets=targets, rank=2))
    install_moe(model, config, key=jax.random.key(seed))
    # Non-zero B (and a larger router) so that experts and routing differ.
    state = nnx.state(model, lora.Adapter)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    state = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), state)
    nnx.update(model, state)
    return model


def block_params(block):
    names = (*block.inputs, block.output)
    params = {}
    for name in names:
        linear, experts = getattr(block, name), getattr(block.experts, name)
        p = {"kernel": np.asarray(linear.kernel[...], np.float64)}
        if linear.bias is not None:
            p["bias"] = np.asarray(linear.bias[...], np.float64)
        p["a"] = np.asarray(experts.a[...], np.float64)
        p["b"] = np.asarray(experts.b[...], np.float64)
        params[name] = p
    if block.router is not None:
        params["w"] = np.asarray(block.router.w[...], np.float64)
        if block.router.w_out is not None:
            params["w_out"] = np.asarray(block.router.w_out[...], np.float64)
    return params


def run_block(block, h):
    """The block's output and its sown (weighted) load-balancing loss."""
    y, inter = nnx.capture(lambda b, x: b(x), nnx.Intermediate)(block, h)
    aux = [v for _, v in nnx.to_flat_state(inter)]
    return np.asarray(y, np.float64), (float(aux[0].get_value()[0]) if aux else None)


def hidden_states(d, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, 5, d)), jnp.float32)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "family_cfg,num_experts,top_k,gate",
    [
        (GPT2, 3, 1, "linear"),
        (GPT2, 3, 2, "linear"),
        (GPT2, 1, 2, "linear"),
        (LLAMA, 3, 2, "tanh_mlp"),
    ],
    ids=["gpt2-k1", "gpt2-k2", "gpt2-E1", "llama-tanh-k2"],
)
def test_block_matches_numpy_per_token_loop(family_cfg, num_experts, top_k, gate):
    config = MoEConfig(num_experts=num_experts, top_k=top_k, rank=2, gate=gate)
    model = moe_model(family_cfg, config)
    layers = model.transformer.h if family_cfg.family == "gpt2" else model.model.layers
    block = layers[0].mlp
    h = hidden_states(family_cfg.d_model)
    y, aux = run_block(block, h)
    params = block_params(block)
    hs = np.asarray(h, np.float64).reshape(-1, family_cfg.d_model)
    want = np_moe(params, hs, top_k, num_experts, family_cfg.family, config.scale)
    np.testing.assert_allclose(y.reshape(-1, family_cfg.d_model), want, rtol=2e-4, atol=2e-5)
    if num_experts == 1:
        assert aux is None and block.router is None
    else:
        logits = np.stack([np_router_logits(params, x) for x in hs])
        lb = np_lb(logits, top_k, num_experts, 0.5)
        np.testing.assert_allclose(aux, config.lb_coef / family_cfg.n_layers * lb, rtol=1e-4)


def test_padded_client_equals_the_unpadded_client():
    """E_max = 4 with 2 real experts = the E = 2 block on the same first two experts; with 1
    real expert, the output is expert 0 alone (the reference's one-expert shortcut)."""
    padded = moe_model(GPT2, MoEConfig(num_experts=4, top_k=2, rank=2))
    small = moe_model(GPT2, MoEConfig(num_experts=2, top_k=2, rank=2))
    h = hidden_states(GPT2.d_model, seed=1)
    hs = np.asarray(h, np.float64).reshape(-1, GPT2.d_model)
    for count in (2, 1):
        state = set_expert_counts(nnx.state(padded), count)
        nnx.update(padded, state)
        block = padded.transformer.h[0].mlp
        np.testing.assert_array_equal(block.expert_mask[...], np.arange(4) < count)
        y, aux = run_block(block, h)
        params = block_params(block)
        want = np_moe(params, hs, 2, count, "gpt2", block.experts.c_fc.scale)
        np.testing.assert_allclose(y.reshape(hs.shape), want, rtol=2e-4, atol=2e-5)
        if count == 2:
            # The same client built unpadded: copy the first two experts and router columns.
            target = small.transformer.h[0].mlp
            for name in ("c_fc", "c_proj"):
                for ab in ("a", "b"):
                    src = getattr(getattr(block.experts, name), ab)[...]
                    getattr(getattr(target.experts, name), ab)[...] = src[:2]
            target.router.w[...] = block.router.w[...][:, :2]
            y_small, aux_small = run_block(target, h)
            np.testing.assert_allclose(y, y_small, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(aux, aux_small, rtol=1e-5)
        else:
            logits = np.stack([np_router_logits(params, x) for x in hs])
            np.testing.assert_allclose(aux * GPT2.n_layers / 0.01, np_lb(logits, 2, 1, 0.5))


@pytest.mark.parametrize(
    "num_experts,k,pi,num_real", [(4, 2, 0.5, 4), (4, 1, 0.7, 4), (3, 2, None, 3), (5, 2, 0.5, 3)]
)
def test_load_balancing_matches_numpy(num_experts, k, pi, num_real):
    rng = np.random.default_rng(num_experts * 10 + k)
    logits = rng.normal(size=(40, num_experts)) * 2
    mask = np.arange(num_experts) < num_real
    masked = np.where(mask, logits, -np.inf)
    got = load_balancing_loss(jnp.asarray(masked, jnp.float32), jnp.asarray(mask), k, pi)
    np.testing.assert_allclose(got, np_lb(logits, k, num_real, pi), rtol=1e-5)


@pytest.mark.parametrize("k,pi", [(2, 0.5), (1, 0.7)])
def test_load_balancing_counts_only_the_real_tokens(k, pi):
    """With a token mask (`Batch.tokens`: an example row's padding 0) the loss is the reference's
    on the real tokens alone."""
    rng = np.random.default_rng(k)
    logits = rng.normal(size=(40, 4)) * 2
    tokens = (rng.uniform(size=40) < 0.6).astype(np.float32)
    got = load_balancing_loss(
        jnp.asarray(logits, jnp.float32), jnp.ones(4, bool), k, pi, jnp.asarray(tokens)
    )
    np.testing.assert_allclose(got, np_lb(logits[tokens > 0], k, 4, pi), rtol=1e-5)


def test_load_balancing_is_the_constant_one_for_two_experts_top2_half():
    rng = np.random.default_rng(0)
    mask = jnp.ones(2, bool)
    fn = lambda z: load_balancing_loss(z, mask, 2, 0.5)
    for _ in range(3):
        z = jnp.asarray(rng.normal(size=(32, 2)) * 3, jnp.float32)
        value, grad = jax.value_and_grad(fn)(z)
        np.testing.assert_allclose(value, 1.0, rtol=1e-6)
        np.testing.assert_allclose(grad, 0.0, atol=1e-7)
