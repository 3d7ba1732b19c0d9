r"""The CoMiGS mixture-of-LoRA-experts MLP block (Fan, Messmer, Doikov & Jaggi, "On-Device
Collaborative Language Modeling via a Mixture of Generalists and Specialists", arXiv:2409.13931,
ICML 2025).

Every MLP of the base model becomes a token-level mixture of `E` experts. Expert `e` is the frozen
base MLP with its own LoRA on every projection (rank `r`, scale `s = α/√r`), and the experts are
mixed *after* the nonlinearity. For GPT-2 (`W1, b1, W2, b2` frozen, `φ` the GELU):

.. math::
    g_e(h) = φ(h W_1 + b_1 + s\,(h A_{1,e}) B_{1,e}), \qquad
    y(h) = \sum_e w_e(h)\,\big[g_e(h) W_2 + b_2 + s\,(g_e(h) A_{2,e}) B_{2,e}\big]

(Llama: `g_e = silu(h W_g + s h A_{g,e} B_{g,e}) ⊙ (h W_u + s h A_{u,e} B_{u,e})`, no biases).
`h W_1` is computed once for all experts; by linearity the frozen `W_2` is applied once to the mixed
activations, `Σ_e w_e g_e W_2 = (Σ_e w_e g_e) W_2`, and the bias enters as `(Σ_e w_e) b_2` (not
`b_2`: with top-1 gating `Σ_e w_e = p_max < 1`). Expert 0 is the generalist (aggregated with the
attention LoRA), experts `1..` the client's specialists.

**Router** (per client, per layer; `Router` variables, trained on validation data; the experts'
stacked LoRA factors are `Expert` variables: these types, not parameter names, tell the server's
mask policies what a tensor is, `fedjax_lora.aggregation.masks`): logits
`z = h W_r` with `W_r ∈ R^{d×E}` ~ N(0, 0.02²), no bias (GPT-2 reference); the Llama reference's
llama-moe gate is `z = tanh(h W_1) W_2` (both ~ N(0, 0.02²), no biases) with optional Gaussian noise
of constant std during training. Experts a client does not have are masked, `z_e = -∞`
(`ExpertMask`, one static shape for clients with different expert counts).

**Gating** (`top_k_gating`): `k ≥ 2`: `w = softmax` over the top-k logits only (zero elsewhere);
`k = 1`: `w_{argmax} = softmax(z)_{argmax}`, not renormalised; `E = 1`: `w = 1`, no router. With
`k_i = min(k, E_i)` this is what padding to `E_max` with `-∞` logits gives, so a client with one
real expert gets exactly `y = expert_0(h)` (the reference's shortcut).

**Load balancing** (`load_balancing_loss`, on the routed input, averaged over layers, weighted by
`λ_LB`, sown as `aux_loss`): over the `E_i` real experts, with `f_e` the share of top-k slots
given to `e` (each selected expert counts `1/k_i`, no gradient) and `P̄_e` the token mean of
`softmax(z scattered into zeros at the top-k entries)` (`k = 1`: the scattered top-1 probability),

.. math:: L_{LB} = E_i \sum_e f_e\,\bar P_e\,c_e, \qquad
    c_0 = \frac{1}{E_i π}, \quad c_{j≥1} = \frac{E_i - 1}{E_i (1 - π)},

`π` the generalist's target share (`c ≡ 1` without one). For `E = k = 2`, `π = 1/2` it is the
constant 1. Token means and sums (here and in the CV² loss) run over the training batch's real
tokens (`Batch.tokens`, `fedjax_lora.engine.loss.routing_tokens`: the right padding of
one-example rows does not count), over every position otherwise.
`reference_lb_on_block_output=True` replicates the GPT-2 reference's `GPT.forward`, which
passes the *block's output* (after the MLP residual, no LayerNorm) to `get_load_balancing_loss`:
the same `L_LB` of the router's logits on that tensor, so its gradient also reaches the LoRA
(spec §1.5; it changes trajectories only for `E > 2` or `π ≠ 1/2`).

**CV² balancing** (`balance_loss="cv2"`, `cv2_balancing_loss`; the Llama reference's llama-moe
`TopKBalancedNoisyGate`, spec §1.6), *summed* over layers, weighted by `λ_LB`:

.. math:: L_{CV} = \mathrm{CV}^2(I ⊙ c) + \mathrm{CV}^2(\ell ⊙ c), \qquad
    \mathrm{CV}^2(x) = \frac{\mathrm{Var}(x)}{\mathrm{mean}(x)^2 + 10^{-10}}

over the real experts (unbiased variance; 0 for one expert), with the importance `I_e = Σ_t w_{te}`
(the block's mixture weights) and the load `ℓ_e`: with gate noise of std `σ` active and `k < E_i`,
the smooth `Σ_t Φ((z_{te} - θ_{te}) / σ)` of Shazeer et al. (2017) (`z` the clean logits, `θ` the
`(k+1)`-th largest noisy logit if `e` is in the noisy top-k, else the `k`-th), otherwise the count
of tokens routed to `e` (no gradient). The reference never passes `π`, so it runs with
`generalist_share=None` (`c ≡ 1`); llama-moe tests membership on the noise alone instead of the
noisy logit (`cv2_noise_quirk=True` reproduces it).

Every block sows its mixture weights `[B, T, E]` as the `nnx.Intermediate` `routing_weights`
(`fedjax_lora.moe.routing` reads them; unused, they cost nothing under `jit`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora.engine.loss import routing_token_mask
from fedjax_lora.lora import Init, init_adapters
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.gpt2 import GPT2MLP, GPT2Block
from fedjax_lora.models.layers import (
    Adapter,
    Expert,
    ExpertMask,
    Linear,
    Router,
    activation,
    dropout,
)
from fedjax_lora.models.llama import LlamaMLP

__all__ = [
    "Expert",
    "ExpertMask",
    "GPT2BlockLBOnOutput",
    "GPT2MoEMLP",
    "LlamaMoEMLP",
    "LoRAExperts",
    "MoEConfig",
    "MoEMLP",
    "Router",
    "ROUTING_WEIGHTS",
    "TokenRouter",
    "cv2_balancing_loss",
    "install_moe",
    "load_balancing_loss",
    "set_expert_counts",
    "top_k_gating",
]


ROUTING_WEIGHTS = "routing_weights"
"""Name of the sown `nnx.Intermediate` holding a block's mixture weights `[B, T, E]`."""


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """A CoMiGS mixture block.

    num_experts: `E_max`, expert slots per MLP (clients may use fewer, `set_expert_counts`).
    top_k: experts mixed per token (`k_i = min(k, E_i)`).
    rank, alpha, lora_dropout: each expert's LoRA, scale `α/√r` (the reference's rsLoRA scaling),
        `A ~ U(±1/√in)`, `B = 0`; dropout on the LoRA input (shared by the experts).
    lb_coef: `λ_LB` of the load-balancing loss (0: not computed).
    generalist_share: `π`, the generalist's target load (`None`: plain balancing, `c ≡ 1`).
    balance_loss: `"switch"` (the GPT-2 reference's `L_LB`, averaged over layers) or `"cv2"` (the
        Llama reference's `CV²(importance) + CV²(load)`, summed over layers; module docstring).
    cv2_noise_quirk: llama-moe's smooth load compares the noise alone, not the noisy logit, with
        the top-k threshold (reference replication; `"cv2"` with gate noise and `k < E` only).
    reference_lb_on_block_output: the GPT-2 reference's quirk, `L_LB` on the router's logits of
        the block output instead of the routed input (module docstring; `"switch"`, GPT-2 only).
    gate: `"linear"` (GPT-2 reference) or `"tanh_mlp"` (the Llama reference's llama-moe gate).
    gate_noise: std of Gaussian noise added to the logits during training (llama-moe's noisy
        top-k with its untrained zero noise weight: `softplus(0) + 0.01 ≈ 0.703`).
    router_std: the router weights' N(0, std²) init.
    """

    num_experts: int = 2
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    lb_coef: float = 0.01
    generalist_share: float | None = 0.5
    gate: Literal["linear", "tanh_mlp"] = "linear"
    gate_noise: float = 0.0
    router_std: float = 0.02
    balance_loss: Literal["switch", "cv2"] = "switch"
    cv2_noise_quirk: bool = False
    reference_lb_on_block_output: bool = False

    def __post_init__(self):
        if self.num_experts < 1 or self.top_k < 1 or self.rank < 1:
            raise ValueError(
                "num_experts, top_k and rank must be >= 1, got "
                f"{self.num_experts}, {self.top_k}, {self.rank}"
            )
        if self.gate not in ("linear", "tanh_mlp"):
            raise ValueError(f"gate must be 'linear' or 'tanh_mlp', got {self.gate!r}")
        if self.balance_loss not in ("switch", "cv2"):
            raise ValueError(f"balance_loss must be 'switch' or 'cv2', got {self.balance_loss!r}")
        if self.generalist_share is not None and not 0.0 < self.generalist_share < 1.0:
            raise ValueError(f"generalist_share must be in (0, 1), got {self.generalist_share}")
        if self.reference_lb_on_block_output and self.balance_loss != "switch":
            raise ValueError(
                "reference_lb_on_block_output replicates the GPT-2 reference's 'switch' loss; "
                f"it does not apply to balance_loss={self.balance_loss!r}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank)

    @property
    def k(self) -> int:
        """The static top-k: `min(top_k, num_experts)`."""
        return min(self.top_k, self.num_experts)


def top_k_gating(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Mixture weights `[..., E]` (zero off the top-k) and the selection `bool [..., E]`.

    `k ≥ 2`: softmax over the k largest logits; `k = 1`: the unnormalised top-1 probability
    `softmax(z)_{argmax}`. `-∞` logits (absent experts) get weight 0 even when selected.
    """
    e = logits.shape[-1]
    if k == 1:
        selected = jax.nn.one_hot(jnp.argmax(logits, -1), e, dtype=bool)
        return jnp.where(selected, jax.nn.softmax(logits, -1), 0.0), selected
    values, index = jax.lax.top_k(logits, k)
    one_hot = jax.nn.one_hot(index, e, dtype=logits.dtype)  # [..., k, E]
    weights = jnp.einsum("...k,...ke->...e", jax.nn.softmax(values, -1), one_hot)
    return weights, one_hot.sum(-2) > 0


def _token_sum(x: jax.Array, tokens: jax.Array | None) -> jax.Array:
    """`Σ_t x_t` over the counted tokens (`tokens [T]` weights; None: all) of `x [T, E]`."""
    return jnp.sum(x, 0) if tokens is None else jnp.sum(x * tokens[:, None], 0)


def _token_mean(x: jax.Array, tokens: jax.Array | None) -> jax.Array:
    """The mean of `x [T, E]` over the counted tokens (`tokens [T]` weights; None: all)."""
    if tokens is None:
        return x.mean(0)
    return _token_sum(x, tokens) / jnp.maximum(jnp.sum(tokens), 1.0)


def load_balancing_loss(
    logits: jax.Array,
    mask: jax.Array,
    k: int,
    generalist_share: float | None,
    tokens: jax.Array | None = None,
) -> jax.Array:
    """`E_i Σ_e f_e P̄_e c_e` over the real experts (`mask`) of `logits [T, E]` (module docstring).

    `logits` are the routed logits with `-∞` at absent experts; `k` is the static top-k;
    `tokens [T]`: 1 on the tokens `f` and `P̄` average over (0 on an example row's padding,
    `fedjax_lora.engine.loss.routing_tokens`); None: every position.
    """
    num = jnp.sum(mask).astype(jnp.float32)  # E_i
    _, selected = top_k_gating(logits, k)
    selected = selected & mask
    if k == 1:
        proxy = jnp.where(selected, jax.nn.softmax(logits, -1), 0.0)
    else:
        scattered = jnp.where(selected, logits, jnp.where(mask, 0.0, -jnp.inf))
        proxy = jax.nn.softmax(scattered, -1)
    density = _token_mean(selected.astype(jnp.float32), tokens) / jnp.minimum(k, num)  # f_e
    factors = _importance_factors(logits.shape[-1], num, generalist_share)
    p_mean = _token_mean(proxy, tokens)
    return num * jnp.sum(jnp.where(mask, density * p_mean * factors, 0.0))


def _routing_tokens(h: jax.Array) -> jax.Array | None:
    """The training batch's real-token mask for activations `h [B, T, d]`, flattened to `[B·T]`
    (`fedjax_lora.engine.loss.routing_tokens`); None: every position counts."""
    tokens = routing_token_mask(h.shape[:-1])
    return None if tokens is None else tokens.reshape(-1).astype(jnp.float32)


def _importance_factors(slots: int, num: jax.Array, generalist_share: float | None) -> jax.Array:
    """`c [slots]`: `1/(E_i π)` for expert 0, `(E_i - 1)/(E_i (1 - π))` for the others; ones
    without `π`."""
    if generalist_share is None:
        return jnp.ones((slots,), jnp.float32)
    pi = generalist_share
    return jnp.where(jnp.arange(slots) == 0, 1.0 / pi, (num - 1) / (1 - pi)) / num


def _cv_squared(x: jax.Array, mask: jax.Array, num: jax.Array) -> jax.Array:
    """`Var(x) / (mean(x)² + 1e-10)` over the real experts (unbiased variance); 0 for one."""
    mean = jnp.sum(jnp.where(mask, x, 0.0)) / num
    var = jnp.sum(jnp.where(mask, (x - mean) ** 2, 0.0)) / jnp.maximum(num - 1, 1.0)
    return jnp.where(num > 1, var / (mean**2 + 1e-10), 0.0)


def cv2_balancing_loss(
    weights: jax.Array,
    logits: jax.Array,
    mask: jax.Array,
    k: int,
    generalist_share: float | None,
    *,
    clean: jax.Array | None = None,
    noise_std: float = 0.0,
    noise_quirk: bool = False,
    tokens: jax.Array | None = None,
) -> jax.Array:
    """`CV²(I ⊙ c) + CV²(ℓ ⊙ c)` over the real experts (`mask`) of one layer (module docstring).

    weights: the mixture weights `[T, E]`; logits: the routed (noisy) logits with `-∞` at absent
    experts; clean: the logits before the noise of std `noise_std` (the smooth load is used when
    both are given and `k < E`, else the selection count); noise_quirk: llama-moe's membership
    test on the noise alone. tokens: `[T]` weights of the counted tokens (as in
    `load_balancing_loss`); None: every position.
    """
    num = jnp.sum(mask).astype(jnp.float32)
    factors = _importance_factors(logits.shape[-1], num, generalist_share)
    importance = _token_sum(weights, tokens)
    if clean is not None and noise_std > 0 and k < logits.shape[-1]:
        floor = -1e9  # absent experts' -∞ made finite (masked out below), so no NaN gradients
        top = jax.lax.top_k(logits, k + 1)[0]
        threshold_in = jnp.maximum(top[:, k : k + 1], floor)
        threshold_out = jnp.maximum(top[:, k - 1 : k], floor)
        z = jnp.where(mask, clean, floor)
        test = jnp.where(mask, logits - clean, floor) if noise_quirk else logits
        prob = jnp.where(
            test > threshold_in,
            jax.scipy.stats.norm.cdf((z - threshold_in) / noise_std),
            jax.scipy.stats.norm.cdf((z - threshold_out) / noise_std),
        )
        load = _token_sum(jnp.where(mask, prob, 0.0), tokens)
    else:
        _, selected = top_k_gating(logits, k)
        load = _token_sum((selected & mask).astype(jnp.float32), tokens)
    return _cv_squared(importance * factors, mask, num) + _cv_squared(load * factors, mask, num)


class LoRAExperts(nnx.Module):
    """E LoRAs on one projection, stacked (`Expert` variables, slot 0 the generalist):
    `a: [E, in, r]`, `b: [E, r, out]`;
    `delta_e(x) = s · (x a_e) b_e` for a shared input `[B, T, in]` or per-expert `[E, B, T, in]`."""

    def __init__(self, num: int, in_features: int, out_features: int, config: MoEConfig, dtype):
        init_a = Init("uniform", bound=1.0 / math.sqrt(in_features))
        self.a = Expert(np.zeros((num, in_features, config.rank), dtype), init=init_a)
        self.b = Expert(np.zeros((num, config.rank, out_features), dtype), init=Init("zeros"))
        self.scale = config.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = self.a[...], self.b[...]
        spec = "btd,edr->ebtr" if x.ndim == 3 else "ebtd,edr->ebtr"
        return self.scale * jnp.einsum("ebtr,ero->ebto", jnp.einsum(spec, x.astype(a.dtype), a), b)


class TokenRouter(nnx.Module):
    """Per-token logits `[B, T, E]` in f32: `h W` (`linear`) or `tanh(h W_in) W_out` (`tanh_mlp`);
    `perturb` adds `gate_noise · N(0, 1)` when `rngs` is given."""

    def __init__(self, d_model: int, config: MoEConfig):
        e, init = config.num_experts, Init("normal", std=config.router_std)
        self.w = Router(np.zeros((d_model, e), np.float32), init=init)
        self.w_out = (
            Router(np.zeros((e, e), np.float32), init=init) if config.gate == "tanh_mlp" else None
        )
        self.noise = config.gate_noise

    def __call__(self, h: jax.Array) -> jax.Array:
        z = jnp.dot(h.astype(jnp.float32), self.w[...])
        if self.w_out is not None:
            z = jnp.dot(jnp.tanh(z), self.w_out[...])
        return z

    def perturb(self, z: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """`z` plus the training-time gate noise (unchanged without `rngs` or noise)."""
        if rngs is not None and self.noise > 0:
            z = z + self.noise * jax.random.normal(rngs.dropout(), z.shape)
        return z


class Experts(nnx.Module):
    """The experts' stacked LoRAs, one `LoRAExperts` attribute per projection name."""

    def __init__(self, projections: dict[str, Linear], config: MoEConfig, dtype):
        for name, linear in projections.items():
            lora = LoRAExperts(
                config.num_experts, linear.in_features, linear.out_features, config, dtype
            )
            setattr(self, name, lora)


def _frozen(linear: Linear) -> Linear:
    """`linear` with any adapters removed (its frozen kernel and bias are kept)."""
    for slot in linear.slot_names():
        if getattr(linear, Linear.slot_attr(slot), None) is not None:
            delattr(linear, Linear.slot_attr(slot))
    return linear


class MoEMLP(nnx.Module):
    """The mixture block over a family's frozen MLP projections (see the module docstring).

    Subclasses name the input projections (`inputs`), the output projection (`output`), and the
    per-expert activation `hidden(pre)` of the pre-activations `{name: [E, B, T, F]}`.
    """

    inputs: tuple[str, ...] = ()
    output: str = ""

    def __init__(self, mlp: nnx.Module, cfg: ModelConfig, config: MoEConfig):
        names = (*self.inputs, self.output)
        projections = {name: _frozen(getattr(mlp, name)) for name in names}
        for name, linear in projections.items():
            setattr(self, name, linear)
        dtype = np.float32
        self.experts = Experts(projections, config, dtype)
        self.router = TokenRouter(cfg.d_model, config) if config.num_experts > 1 else None
        self.expert_mask = ExpertMask(np.ones((config.num_experts,), bool))
        self.cfg = cfg
        self.k = config.k
        self.balance_loss = config.balance_loss
        self.cv2_noise_quirk = config.cv2_noise_quirk
        self.lb_on_block_output = config.reference_lb_on_block_output
        # `switch` is averaged over the layers, `cv2` summed (the two references).
        self.lb_coef = config.lb_coef / (cfg.n_layers if config.balance_loss == "switch" else 1)
        self.generalist_share = config.generalist_share
        self.lora_dropout = config.lora_dropout

    def hidden(self, pre: dict[str, jax.Array]) -> jax.Array:
        raise NotImplementedError

    def route(self, h: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """Mixture weights `[B, T, E]`; sows them (`ROUTING_WEIGHTS`) and the weighted balancing
        loss."""
        if self.router is None:
            return jnp.ones((*h.shape[:-1], 1), jnp.float32)
        mask = self.expert_mask[...]
        clean = jnp.where(mask, self.router(h), -jnp.inf)
        logits = self.router.perturb(clean, rngs)
        weights, _ = top_k_gating(logits, self.k)
        if self.lb_coef > 0 and not self.lb_on_block_output:
            flat = lambda x: x.reshape(-1, x.shape[-1])
            tokens = _routing_tokens(h)
            if self.balance_loss == "cv2":
                lb = cv2_balancing_loss(
                    flat(weights),
                    flat(logits),
                    mask,
                    self.k,
                    self.generalist_share,
                    clean=flat(clean),
                    noise_std=self.router.noise if rngs is not None else 0.0,
                    noise_quirk=self.cv2_noise_quirk,
                    tokens=tokens,
                )
            else:
                lb = load_balancing_loss(flat(logits), mask, self.k, self.generalist_share, tokens)
            self.sow(nnx.Intermediate, "aux_loss", self.lb_coef * lb)
        self.sow(nnx.Intermediate, ROUTING_WEIGHTS, weights)
        return weights

    def balance_block_output(self, out: jax.Array) -> None:
        """Sows the weighted `L_LB` of the router's logits on the block output `out [B, T, d]`
        (`MoEConfig.reference_lb_on_block_output`; called by `GPT2BlockLBOnOutput`)."""
        if self.router is None or self.lb_coef == 0:
            return
        mask = self.expert_mask[...]
        logits = jnp.where(mask, self.router(out), -jnp.inf)
        tokens = _routing_tokens(out)
        logits = logits.reshape(-1, logits.shape[-1])
        lb = load_balancing_loss(logits, mask, self.k, self.generalist_share, tokens)
        self.sow(nnx.Intermediate, "aux_loss", self.lb_coef * lb)

    def __call__(self, h: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = dropout(h, self.lora_dropout, rngs)
        pre = {
            name: getattr(self, name)(h)[None] + getattr(self.experts, name)(x).astype(h.dtype)
            for name in self.inputs
        }
        hidden = self.hidden(pre)  # [E, B, T, F]
        weights = self.route(h, rngs).astype(hidden.dtype)  # [B, T, E]
        out = getattr(self, self.output)
        kernel = out.kernel[...]
        y = jnp.dot(jnp.einsum("bte,ebtf->btf", weights, hidden).astype(kernel.dtype), kernel)
        if out.bias is not None:
            y = y + weights.sum(-1, keepdims=True) * out.bias[...]
        delta = getattr(self.experts, self.output)(hidden)
        return y + jnp.einsum("bte,ebtd->btd", weights, delta.astype(y.dtype))


class GPT2MoEMLP(MoEMLP):
    """GPT-2: `g_e = act(c_fc_e(h))`, output `c_proj`, residual dropout after mixing."""

    inputs = ("c_fc",)
    output = "c_proj"

    def hidden(self, pre):
        return activation(self.cfg.activation, pre["c_fc"])

    def __call__(self, h, rngs=None):
        return dropout(super().__call__(h, rngs), self.cfg.dropout, rngs)


class LlamaMoEMLP(MoEMLP):
    """Llama SwiGLU: `g_e = silu(gate_e(h)) ⊙ up_e(h)`, output `down_proj`."""

    inputs = ("gate_proj", "up_proj")
    output = "down_proj"

    def hidden(self, pre):
        return activation("silu", pre["gate_proj"]) * pre["up_proj"]


class GPT2BlockLBOnOutput(GPT2Block):
    """A GPT-2 block whose mixture's load-balancing loss is taken on the block's output, as the
    reference's `GPT.forward` does (`MoEConfig.reference_lb_on_block_output`); same parameters."""

    def __call__(self, x, attention_mask, rngs, cache=None):
        out, cache = super().__call__(x, attention_mask, rngs, cache)
        self.mlp.balance_block_output(out)
        return out, cache


_BLOCKS: dict[type, type[MoEMLP]] = {GPT2MLP: GPT2MoEMLP, LlamaMLP: LlamaMoEMLP}


def install_moe(model: nnx.Module, config: MoEConfig, *, key: jax.Array | None = None) -> list[str]:
    """Replaces every MLP of `model` (GPT-2 or Llama) by a mixture block, in place, and redraws
    all adapters from `key` (as `lora.add_lora`). LoRA already on the MLP projections is dropped
    (the experts replace it); attention LoRA stays. Returns the replaced module paths."""
    key = jax.random.key(0) if key is None else key
    replaced = []
    for path, module in list(nnx.iter_graph(model)):
        mlp = getattr(module, "mlp", None) if isinstance(module, nnx.Module) else None
        if type(mlp) in _BLOCKS:
            module.mlp = _BLOCKS[type(mlp)](mlp, model.config, config)
            replaced.append(".".join(map(str, (*path, "mlp"))))
            if config.reference_lb_on_block_output:
                if type(module) is not GPT2Block:
                    raise ValueError(
                        "reference_lb_on_block_output replicates the GPT-2 reference; the model's "
                        f"blocks are {type(module).__name__}"
                    )
                module.__class__ = GPT2BlockLBOnOutput  # same state, the reference's LB call
    if not replaced:
        raise ValueError("install_moe found no GPT-2 or Llama MLP in the model")
    nnx.update(model, jax.jit(init_adapters)(nnx.state(model, Adapter), key))
    return replaced


def set_expert_counts(params: nnx.State, count: jax.Array | int) -> nnx.State:
    """One client's state with every `ExpertMask` set to its first `count` experts (vmap over a
    stacked state and counts `[N]` for per-client expert numbers)."""
    flat = []
    for path, var in nnx.to_flat_state(params):
        if isinstance(var, ExpertMask):
            var = var.replace(jnp.arange(var.get_value().shape[-1]) < count)
        flat.append((path, var))
    return nnx.from_flat_state(flat)
