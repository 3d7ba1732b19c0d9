r"""The AMoLE module of FedAMoLE: a heterogeneous mixture of LoRA experts on one projection.

Zhang, Qin, Wu, Hou & Deng, "Personalized Federated Fine-Tuning for LLMs via Data-Driven
Heterogeneous Model Architectures" (arXiv:2411.19128; "AMoLE" in v1/v2, "HMoLE" from v3;
reference `zyc140345/FedAMoLE`, `model/mole/layer.py::MoLELinear.forward`).

A projection `y = W₀x` gets `E` domain experts `f_e(x) = s · dropout(x) A_e B_e` (`A_e: (in, r)`,
`B_e: (r, out)`, `s = α/r`), one always-on shared LoRA expert `f_sh`, and a token projection
`W_tok: (in, r)` as router. The key of expert `e` is its own `A_e` (not detached):

.. math:: l_e(x) = \langle x A_e,\; x W_{tok} \rangle / \sqrt{r}, \qquad
          p = \mathrm{softmax}_{e \in S}(l(x)),

over the set `S` of experts the client holds in this module (a boolean mask over the full pool,
`ExpertMask`, so shapes stay static; `-∞` elsewhere). With `K` the top-`k` of `p` (`k = 2`) and
`g_e = p_e / Σ_{j∈K} p_j` on `K`, 0 elsewhere,

.. math:: y = W_0 x + f_{sh}(x) + \sum_{e \in K} g_e f_e(x).

Routing uses `x` without dropout; every (token, slot) pair draws its own dropout mask, as each
expert's own PEFT dropout does in the reference. Non-held experts get exactly zero gate, so their
gradients are exactly zero. The Switch-style load-balancing loss over the real tokens `X` of the
call (`n = |S|`, `f` without gradient),

.. math:: L_{lb} = n \sum_e P_e f_e, \quad P_e = \mathrm{mean}_{x \in X}\, p_e(x), \quad
          f_e = \#\{\text{top-}k \text{ slots on } e \text{ over } X\} / (k |X|),

where `X` is every position of the call unless the training loss marks real tokens
(`fedjax_lora.engine.loss.routing_tokens`, set from `Batch.tokens`: the right padding of one-example
rows is no token). The reference averages over all `B·T` positions of its batch, which at its
default batch size 1 is exactly the example's tokens (`docs/fidelity.md`, FedAMoLE row 3). It
is sown, times `load_balance` (0.001), as the `aux_loss` intermediate, so the engine's loss sums it
over modules. The per-token embeddings `x W_tok` and `x A_e` are sown as `RoutingEmbeddings`
(captured only by `fedjax_lora.amole.stats`). Both are sown only under `nnx.capture`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora.engine.loss import AUX_LOSS, routing_token_mask
from fedjax_lora.lora import Init, LoRA, LoRAConfig, attach_adapters
from fedjax_lora.models.layers import Adapter, ExpertMask, dropout

__all__ = [
    "AMoLE",
    "AMoLEConfig",
    "ExpertMask",
    "RoutingEmbeddings",
    "add_amole",
    "by_module",
    "expert_masks",
    "holders",
    "module_path",
]

EMBEDDINGS = "embeddings"


class RoutingEmbeddings(nnx.Variable):
    """Sown per-token `(x W_tok [..., r], x A_e [..., E, r])` (RSEA statistics)."""


@dataclasses.dataclass(frozen=True)
class AMoLEConfig:
    """Where and how AMoLE modules are attached.

    targets: projection patterns (`LoRAConfig.targets` rule); the reference adapts `q_proj` and
      `v_proj` (PEFT's Llama default). num_experts: the pool size `E` per module. rank, alpha,
      dropout: every expert's (and the shared expert's) LoRA, scaling `α/r`, PEFT's
      Kaiming-uniform `A ~ U(±1/√in)`, `B = 0`. top_k: router top-k. load_balance: coefficient of
      the load-balancing loss. `W_tok ~ U(±1/√in)` (PyTorch's `nn.Linear` default).
    """

    targets: tuple[str, ...] = ("q_proj", "v_proj")
    num_experts: int = 30
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    top_k: int = 2
    load_balance: float = 1e-3
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"need 1 <= top_k <= num_experts, got {self.top_k}, {self.num_experts}"
            )

    @property
    def lora(self) -> LoRAConfig:
        """The LoRA every expert is (scaling `α/r`, PEFT init)."""
        return LoRAConfig(
            targets=self.targets,
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            scaling="alpha/r",
            init="kaiming_uniform",
            init_fan="in",
            dtype=self.dtype,
        )


class AMoLE(nnx.Module):
    """`delta(x) = f_sh(x) + Σ_{e∈top-k} g_e f_e(x)` (module docstring); an adapter for a
    `Linear` slot."""

    def __init__(self, in_features: int, out_features: int, config: AMoLEConfig):
        lora = config.lora
        dtype = jnp.dtype(config.dtype)
        e, r = config.num_experts, config.rank
        self.experts_a = Adapter(
            np.zeros((e, in_features, r), dtype), init=lora.a_init(in_features)
        )
        self.experts_b = Adapter(np.zeros((e, r, out_features), dtype), init=Init("zeros"))
        self.token_proj = Adapter(
            np.zeros((in_features, r), dtype),
            init=Init("uniform", bound=1 / math.sqrt(in_features)),
        )
        self.shared = LoRA(in_features, out_features, lora)
        self.held = ExpertMask(np.ones((e,), bool))
        self.scale = lora.scale
        self.dropout = config.dropout
        self.top_k = config.top_k
        self.load_balance = config.load_balance

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        a, b, held = self.experts_a[...], self.experts_b[...], self.held[...]
        num_experts, _, rank = a.shape
        h = x.astype(a.dtype)
        token = h @ self.token_proj[...]  # [..., r]
        keys = jnp.einsum("...d,edr->...er", h, a)  # [..., E, r]
        logits = jnp.einsum("...er,...r->...e", keys, token) / math.sqrt(rank)
        probs = jax.nn.softmax(jnp.where(held, logits, -jnp.inf), axis=-1)
        top, chosen = jax.lax.top_k(probs, self.top_k)  # [..., k]
        slots = jax.nn.one_hot(chosen, num_experts, dtype=a.dtype)  # [..., k, E]
        gates = slots * (top / jnp.sum(top, -1, keepdims=True))[..., None]
        # Every (token, slot) pair has its own dropout draw; only the chosen expert is kept.
        xk = jnp.broadcast_to(h[..., None, :], (*h.shape[:-1], self.top_k, h.shape[-1]))
        z = jnp.einsum("...kd,edr->...ker", dropout(xk, self.dropout, rngs), a)
        z = jnp.einsum("...ker,...ke->...er", z, gates)
        routed = self.scale * jnp.einsum("...er,ero->...o", z, b)

        mask = routing_token_mask(probs.shape[:-1])
        w = jnp.ones(probs.shape[:-1], probs.dtype) if mask is None else mask.astype(probs.dtype)
        w = w.reshape(-1, 1)
        count = jnp.maximum(jnp.sum(w), 1.0)
        p_mean = jnp.sum(probs.reshape(-1, num_experts) * w, 0) / count
        f = jnp.sum(slots.sum(-2).reshape(-1, num_experts) * w, 0) / (self.top_k * count)
        n = jnp.sum(held).astype(p_mean.dtype)
        lb = n * jnp.sum(p_mean * jax.lax.stop_gradient(f))
        if hasattr(self, "__captures__"):  # what `Module.sow` itself tests
            # Recorded only under `nnx.capture` (the training loss, RSEA statistics): a plain call
            # (evaluation, decoding) may run inside `lax.map` over a model merged outside it,
            # where NNX forbids storing on the module.
            self.sow(nnx.Intermediate, AUX_LOSS, self.load_balance * lb)
            self.sow(RoutingEmbeddings, EMBEDDINGS, (token, keys))
        return self.shared(x, rngs) + routed


def add_amole(model: nnx.Module, config: AMoLEConfig, *, key: jax.Array | None = None) -> list[str]:
    """Attaches an `AMoLE` to every projection slot matching `config.targets`, in place (as
    `lora.add_lora`), and draws all adapters from `key`: each expert's `A`, the shared expert's
    `A` and `W_tok` independently, all `B = 0`. Returns the adapted paths."""
    make = lambda in_features, out_features: AMoLE(in_features, out_features, config)
    return attach_adapters(model, config.targets, make, key=key)


def module_path(path: tuple) -> str:
    """`("model", "layers", 0, "self_attn", "q_proj", "lora")` -> `"model.layers.0....lora"`."""
    return ".".join(str(p) for p in path)


def by_module(masks: nnx.State) -> dict[str, Any]:
    """`{module path: mask value}` of an `ExpertMask` state (stacked or not)."""
    return {module_path(p[:-1]): v.get_value() for p, v in nnx.to_flat_state(masks)}


def expert_masks(state: nnx.State) -> nnx.State:
    """The `ExpertMask` variables of a model's state (e.g. a `Problem.frozen`)."""
    masks, _ = nnx.split_state(state, ExpertMask, ...)
    if not jax.tree.leaves(masks):
        raise ValueError("the model holds no AMoLE modules; attach some with amole.add_amole")
    return masks


def holders(params: nnx.State, masks: nnx.State) -> nnx.State:
    """For `fedjax_lora.aggregation.experts`: per adapter leaf of the stacked `params`, which
    clients hold it — the module's `masks [N, E]` for `experts_a`/`experts_b`, all clients `[N]` for
    everything else (shared expert, `W_tok`, any other adapter)."""
    held = by_module(masks)
    flat = []
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        mask = held.get(module_path(path[:-1])) if path[-1] in _EXPERT_LEAVES else None
        flat.append((path, var.replace(jnp.ones(value.shape[:1], bool) if mask is None else mask)))
    return nnx.from_flat_state(flat)


_EXPERT_LEAVES = ("experts_a", "experts_b")


def held_by_all(names: Sequence[str]) -> bool:
    """Whether every client holds the adapter leaf at path `names` (the shared expert, `W_tok`, any
    other adapter; not a domain expert pool): FedAMoLE's global part, a mask policy predicate of
    `fedjax_lora.aggregation.masks`."""
    return names[-1] not in _EXPERT_LEAVES
