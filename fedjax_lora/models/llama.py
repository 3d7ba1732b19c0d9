"""Llama family (Llama-3.x incl. rope scaling, SmolLM2, Qwen2/2.5 with q/k/v biases) in Flax NNX.

Module paths mirror Hugging Face `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj`, ...):
RMSNorm, rotary embeddings (half-split convention), grouped-query attention, SwiGLU MLP, tied or
untied head.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from fedjax_lora.models.causal_lm import CausalLM
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    activation,
    apply_rope,
    dropout,
    rope_inverse_frequencies,
    self_attention,
)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any):
        self.cfg = cfg
        d, dh = cfg.d_model, cfg.dim_per_head
        kv = cfg.num_kv_heads * dh
        self.q_proj = Linear(d, cfg.n_heads * dh, use_bias=cfg.qkv_bias, dtype=dtype)
        self.k_proj = Linear(d, kv, use_bias=cfg.qkv_bias, dtype=dtype)
        self.v_proj = Linear(d, kv, use_bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = Linear(cfg.n_heads * dh, d, use_bias=False, dtype=dtype)

    def __call__(self, x, positions, inv_freq, attention_mask, rngs, cache=None):
        b, t, _ = x.shape
        cfg, dh = self.cfg, self.cfg.dim_per_head
        q = self.q_proj(x, rngs).reshape(b, t, cfg.n_heads, dh)
        k = self.k_proj(x, rngs).reshape(b, t, cfg.num_kv_heads, dh)
        v = self.v_proj(x, rngs).reshape(b, t, cfg.num_kv_heads, dh)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        out, cache = self_attention(
            q, k, v, cache, attention_mask=attention_mask, dropout_rate=cfg.attn_dropout, rngs=rngs
        )
        return self.o_proj(out.reshape(b, t, cfg.n_heads * dh), rngs), cache


class LlamaMLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, cfg: ModelConfig, dtype: Any):
        self.gate_proj = Linear(cfg.d_model, cfg.d_ff, use_bias=False, dtype=dtype)
        self.up_proj = Linear(cfg.d_model, cfg.d_ff, use_bias=False, dtype=dtype)
        self.down_proj = Linear(cfg.d_ff, cfg.d_model, use_bias=False, dtype=dtype)

    def __call__(self, x, rngs):
        hidden = activation("silu", self.gate_proj(x, rngs)) * self.up_proj(x, rngs)
        return self.down_proj(hidden, rngs)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any):
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(cfg, dtype)

    def __call__(self, x, positions, inv_freq, attention_mask, rngs, cache=None):
        h, cache = self.self_attn(
            self.input_layernorm(x), positions, inv_freq, attention_mask, rngs, cache
        )
        x = x + dropout(h, self.cfg.dropout, rngs)
        h = self.mlp(self.post_attention_layernorm(x), rngs)
        return x + dropout(h, self.cfg.dropout, rngs), cache


class LlamaModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, dtype) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)


class LlamaForCausalLM(CausalLM):
    """Llama-family decoder with a tied or untied output head."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32):
        super().__init__(cfg, "llama", dtype)
        self.model = LlamaModel(cfg, dtype)

    def embedding(self) -> Embed:
        return self.model.embed_tokens

    def hidden_states(self, tokens, positions, attention_mask, rngs, cache=None):
        cfg = self.config
        inv_freq = rope_inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
        x = self.input_embeddings(tokens, rngs)
        caches = []
        for i, layer in enumerate(self.model.layers):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = self.layer(
                layer, x, positions, inv_freq, attention_mask, rngs, layer_cache
            )
            caches.append(layer_cache)
        x = self.model.norm(x)
        return x if cache is None else (x, tuple(caches))
