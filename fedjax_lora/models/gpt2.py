"""GPT-2 family (gpt2, gpt2-medium/large/xl, distilgpt2) in Flax NNX.

Module paths mirror Hugging Face `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn`, ...): learned
positions, pre-LayerNorm blocks, fused `c_attn` with named q/k/v slices, tied output head.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from fedjax_lora.models.causal_lm import CausalLM
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.layers import (
    Embed,
    LayerNorm,
    Linear,
    activation,
    dropout,
    self_attention,
)


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any):
        d = cfg.d_model
        self.cfg = cfg
        slices = {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d)}
        self.c_attn = Linear(d, 3 * d, use_bias=True, dtype=dtype, slices=slices)
        self.c_proj = Linear(d, d, use_bias=True, dtype=dtype)

    def __call__(self, x, attention_mask, rngs, cache=None):
        b, t, _ = x.shape
        h, dh = self.cfg.n_heads, self.cfg.dim_per_head
        q, k, v = jnp.split(self.c_attn(x, rngs), 3, axis=-1)
        shape = (b, t, h, dh)
        out, cache = self_attention(
            q.reshape(shape),
            k.reshape(shape),
            v.reshape(shape),
            cache,
            attention_mask=attention_mask,
            dropout_rate=self.cfg.attn_dropout,
            rngs=rngs,
        )
        out = dropout(self.c_proj(out.reshape(b, t, h * dh), rngs), self.cfg.dropout, rngs)
        return out, cache


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any):
        self.cfg = cfg
        self.c_fc = Linear(cfg.d_model, cfg.d_ff, use_bias=True, dtype=dtype)
        self.c_proj = Linear(cfg.d_ff, cfg.d_model, use_bias=True, dtype=dtype)

    def __call__(self, x, rngs):
        hidden = activation(self.cfg.activation, self.c_fc(x, rngs))
        return dropout(self.c_proj(hidden, rngs), self.cfg.dropout, rngs)


class GPT2Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any):
        self.ln_1 = LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.attn = GPT2Attention(cfg, dtype)
        self.ln_2 = LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.mlp = GPT2MLP(cfg, dtype)

    def __call__(self, x, attention_mask, rngs, cache=None):
        h, cache = self.attn(self.ln_1(x), attention_mask, rngs, cache)
        x = x + h
        return x + self.mlp(self.ln_2(x), rngs), cache


class GPT2Model(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any):
        self.wte = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype)
        self.wpe = Embed(cfg.max_positions, cfg.d_model, dtype=dtype)
        self.h = nnx.List([GPT2Block(cfg, dtype) for _ in range(cfg.n_layers)])
        self.ln_f = LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with a tied (or separate) output head."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32):
        super().__init__(cfg, "gpt2", dtype)
        self.transformer = GPT2Model(cfg, dtype)

    def embedding(self) -> Embed:
        return self.transformer.wte

    def hidden_states(self, tokens, positions, attention_mask, rngs, cache=None):
        tr = self.transformer
        x = dropout(
            self.input_embeddings(tokens, rngs) + tr.wpe(positions), self.config.dropout, rngs
        )
        caches = []
        for i, block in enumerate(tr.h):
            x, layer_cache = self.layer(
                block, x, attention_mask, rngs, None if cache is None else cache[i]
            )
            caches.append(layer_cache)
        x = tr.ln_f(x)
        return x if cache is None else (x, tuple(caches))
