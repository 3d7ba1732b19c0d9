"""Building blocks shared by the model families: frozen projections with adapter slots, norms,
embeddings, rotary position embeddings and causal attention (with an optional key/value cache
for decoding).

Parameters are created as host (NumPy) arrays, so building a model compiles nothing; loaders and
initialisers fill them and move them to devices in one transfer. Frozen base weights are
`nnx.Param`; everything a client trains is an `Adapter` variable, and what parameterises one
client's model without being trained (expert masks, rank scales) a `ClientFrozen` variable, so
`nnx.split(model, Adapter, ClientFrozen, ...)` separates the per-client adapters and frozen state
from the shared base. An adapter's role for the server is its type: `Router` (mixture routers)
and `Expert` (stacked mixture experts) are `Adapter`s that the mask policies of
`fedjax_lora.aggregation.masks` recognise; every other adapter is shared LoRA.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora.models.config import FrozenMapping


class Adapter(nnx.Variable):
    """A trainable per-client variable (LoRA factors, routers, prompts)."""


class Router(Adapter):
    """A mixture's token-router weights (CoMiGS): trained per client by the router optimizer and
    never averaged by the mask policies other than `all` (`fedjax_lora.aggregation.masks`)."""


class Expert(Adapter):
    """One LoRA factor of a mixture's experts, stacked on a leading expert axis `[E, ...]`
    (CoMiGS's `LoRAExperts`); slot 0 is the generalist, which the `expert_0` and `expert_01`
    policies average (`fedjax_lora.aggregation.masks`)."""


class ClientFrozen(nnx.Variable):
    """A per-client variable that parameterises a client's model but is never trained by the
    client (set by the method or its server: expert masks, rank scales). A simulation holds one
    value per client in `ClientState.frozen`, merged over the shared base for that client; the
    server never averages it (`fedjax_lora.aggregation.masks`)."""


class ExpertMask(ClientFrozen):
    """`bool [E]`: which expert slots of a mixture a client holds (all by default): CoMiGS's
    per-client expert counts, FedAMoLE's expert assignment. Slots off are never routed to."""


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout; the identity when `rngs` is None (evaluation) or `rate == 0`."""
    if rngs is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Linear(nnx.Module):
    """`y = x @ kernel + bias + Σ_slots delta_slot(x)` with a frozen `(in, out)` kernel.

    `slices` names contiguous output ranges of a fused projection (GPT-2's `c_attn` holds q, k, v)
    so an adapter can be attached to one slice (`lora_q`) or to the whole output (`lora`).
    An adapter slot holds any module mapping `(x, rngs) -> delta` of the slot's output width.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        dtype: Any = jnp.float32,
        slices: dict[str, tuple[int, int]] | None = None,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = nnx.Param(np.zeros((in_features, out_features), dtype))
        self.bias = nnx.Param(np.zeros((out_features,), dtype)) if use_bias else None
        self.slices = FrozenMapping(slices or {})  # hashable: GraphDefs stay hashable

    def slot_names(self) -> tuple[str, ...]:
        """Adapter slots: `''` for the whole output, then one per named slice."""
        return ("", *self.slices)

    def slot_width(self, slot: str) -> int:
        if slot == "":
            return self.out_features
        start, stop = self.slices[slot]
        return stop - start

    @staticmethod
    def slot_attr(slot: str) -> str:
        return "lora" if slot == "" else f"lora_{slot}"

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        kernel = self.kernel[...]
        y = jnp.dot(x.astype(kernel.dtype), kernel)
        if self.bias is not None:
            y = y + self.bias[...]
        for slot in self.slot_names():
            adapter = getattr(self, self.slot_attr(slot), None)
            if adapter is None:
                continue
            delta = adapter(x, rngs).astype(y.dtype)
            if slot == "":
                y = y + delta
            else:
                start, stop = self.slices[slot]
                y = y.at[..., start:stop].add(delta)
        return y


class Embed(nnx.Module):
    """Token (or position) embedding table `weight: (num, d)`."""

    def __init__(self, num: int, features: int, *, dtype: Any = jnp.float32):
        self.weight = nnx.Param(np.zeros((num, features), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: `x @ weight.T`, computed in f32."""
        return jnp.dot(x.astype(jnp.float32), self.weight[...].astype(jnp.float32).T)


class LayerNorm(nnx.Module):
    """`(x - mean) / sqrt(var + eps) * weight + bias`, statistics in f32."""

    def __init__(self, features: int, *, eps: float, dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(np.ones((features,), dtype))
        self.bias = nnx.Param(np.zeros((features,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        weight, bias = self.weight[...].astype(jnp.float32), self.bias[...].astype(jnp.float32)
        return (h * weight + bias).astype(x.dtype)


class RMSNorm(nnx.Module):
    """`x / sqrt(mean(x²) + eps) * weight` (Llama), statistics in f32."""

    def __init__(self, features: int, *, eps: float, dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(np.ones((features,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * h).astype(x.dtype)


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None
) -> jax.Array:
    """RoPE inverse frequencies `theta^(-2i/d)`, with Llama-3 frequency scaling when asked.

    Llama-3 (`rope_type="llama3"`): wavelengths above `original_max / low_freq_factor` are divided
    by `factor`, those below `original_max / high_freq_factor` kept, and the band between is
    interpolated smoothly (as in transformers' `_compute_llama3_parameters`). `"linear"` divides
    all frequencies by `factor`.
    """
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r}; supported: 'llama3', 'linear'")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the Hugging Face half-split convention (`rotate_half`).

    x: [B, T, H, Dh]; positions: [B, T].
    """
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    h = x.astype(jnp.float32)
    x1, x2 = jnp.split(h, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class KVCache(NamedTuple):
    """One attention layer's keys and values on a fixed decoding buffer of `S` slots.

    k, v: `[B, S, Hkv, Dh]`; slot `s` holds the key/value of buffer position `s` once written;
    index: `int32 []`, the number of slots written so far (the next write starts there).
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, batch: int, slots: int, kv_heads: int, head_dim: int, dtype: Any) -> KVCache:
        shape = (batch, slots, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def write(self, k: jax.Array, v: jax.Array) -> KVCache:
        """`k, v: [B, t, Hkv, Dh]` stored at slots `index … index + t - 1`."""
        put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
            buf, x.astype(buf.dtype), self.index, axis=1
        )
        return KVCache(put(self.k, k), put(self.v, v), self.index + k.shape[1])


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    query_offset: jax.Array | int = 0,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> jax.Array:
    """Softmax attention with a causal mask and grouped-query heads.

    q: [B, T, H, Dh]; k, v: [B, S, Hkv, Dh] with H a multiple of Hkv; query `i` sits at key slot
    `query_offset + i` and attends to slots `<= query_offset + i` (S = T, offset 0 for a plain
    forward; a `KVCache` buffer otherwise); attention_mask: optional [B, S] (1 = real token)
    masking padded keys. Scores and softmax in f32. Returns [B, T, H, Dh].
    """
    b, t, h, dh = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    groups = h // kv_heads
    qg = q.reshape(b, t, kv_heads, groups, dh).astype(jnp.float32)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32)) / math.sqrt(dh)
    mask = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + query_offset
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, None, :].astype(bool)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, rngs)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, h, dh).astype(q.dtype)


def self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: KVCache | None,
    *,
    attention_mask: jax.Array | None = None,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """`causal_attention` over this call's keys (no cache) or, with a `KVCache`, over the buffer
    after writing this call's keys at `cache.index` (prefill: the whole prompt; decoding: one
    token). With a cache, `attention_mask` is the `[B, S]` key mask of the whole buffer.
    Returns the attention output and the updated cache (None without one)."""
    if cache is None:
        out = causal_attention(
            q, k, v, attention_mask=attention_mask, dropout_rate=dropout_rate, rngs=rngs
        )
        return out, None
    offset = cache.index
    cache = cache.write(k, v)
    out = causal_attention(
        q,
        cache.k,
        cache.v,
        attention_mask=attention_mask,
        query_offset=offset,
        dropout_rate=dropout_rate,
        rngs=rngs,
    )
    return out, cache


def activation(name: str, x: jax.Array) -> jax.Array:
    """GELU (tanh approximation or exact erf) or SiLU."""
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu_erf":
        return jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown activation {name!r}")
