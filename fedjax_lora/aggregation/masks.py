r"""Which adapter tensors are global (averaged by the server) and which are trained: pure mask
policies over stacked client trees, and the aggregator that averages only the global part.

Leaves are classified by their variable type, which the module creating them declares
(`fedjax_lora.models.layers`): a `Router` variable is a *router*; an `Expert` variable holds
stacked mixture experts `[N, E, ...]` (slot 0 the generalist); everything else (attention LoRA,
plain LoRA, and any leaf that is not an NNX variable) is *shared* LoRA. NNX states keep their
variables' types through `jax.tree` maps, `vmap`, `nnx.split_state` / `merge_state` and a
checkpoint restore (the restored tree is the run's own template). Within a LoRA, `a` and `b` are
the factors' attribute names (`fedsa`, `ffa`). Per-client structure (expert masks) is not among
the adapters: it is the clients' frozen state (`ClientFrozen`, `ClientState.frozen`), which no
policy averages. Policies (Fan et al., CoMiGS, arXiv:2409.13931, `collaboration_strategies.py`):

- `none`: nothing global (local training).
- `all`: everything global, routers included.
- `experts`: all LoRA global, routers local (CoMiGS-2G, FedAvg-MoE).
- `expert_0`: expert 0 and the shared LoRA global; specialists and routers local (CoMiGS,
  pFedMoE).
- `expert_01`: experts 0 and 1 and the shared LoRA global.
- `ffa`: all LoRA global, and the experts' `A` frozen after the shared init (FFA-LoRA, Sun et
  al. 2024; as the icml reference: attention `A` stays trained).
- `fedsa`: every LoRA `A` global, every `B` local (FedSA-LoRA, Guo et al. 2024, the faithful
  version; the icml reference makes everything global).

A policy may also be a predicate over a leaf's path names (`names -> bool`, True: global), e.g.
FFA-LoRA's "every leaf but the frozen `A`s" on plain LoRA.

The aggregator: :math:`θ ← \mathrm{where}(m, \sum_j p_j θ_j, θ)` leaf by leaf, `p` uniform (the
reference's 1/N) or proportional to `inputs["weights"]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike
from jaxtyping import Real

from fedjax_lora.aggregation.core import Aggregator, Inputs, fedavg
from fedjax_lora.models.layers import Expert, Router
from fedjax_lora.typing import PyTree

__all__ = [
    "POLICIES",
    "Policy",
    "PolicyArg",
    "global_mask",
    "leaf_role",
    "masked_aggregator",
    "merge_global",
    "path_names",
    "trainable",
]

Policy = Literal["none", "all", "experts", "expert_0", "expert_01", "ffa", "fedsa"]
POLICIES: tuple[str, ...] = ("none", "all", "experts", "expert_0", "expert_01", "ffa", "fedsa")
PolicyArg = Policy | Callable[[tuple[str, ...]], bool]
"""A policy name or a predicate over a leaf's path names (True: global)."""
Role = Literal["router", "experts", "shared"]


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """The string components of a pytree key path (`DictKey`, `GetAttrKey`, `SequenceKey`) or of
    an NNX state path; NNX's trailing `value` attribute is dropped."""
    names = []
    for p in path:
        name = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        names.append(str(name))
    return tuple(names[:-1] if names and names[-1] == "value" else names)


def leaf_role(leaf: Any) -> Role:
    """A leaf's role by its variable type: `"router"` for a `Router`, `"experts"` for an
    `Expert` (stacked mixture experts), `"shared"` for anything else."""
    if isinstance(leaf, Router):
        return "router"
    if isinstance(leaf, Expert):
        return "experts"
    return "shared"


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _check(policy: Policy | Callable[[tuple[str, ...]], bool]) -> None:
    if not callable(policy) and policy not in POLICIES:
        raise ValueError(f"unknown mask policy {policy!r}; expected one of {POLICIES}")


def _leaf_mask(names: tuple[str, ...], role: Role, leaf: ArrayLike, policy) -> jax.Array:
    """`bool`, broadcastable to the stacked leaf `[N, ...]`."""
    if callable(policy):
        return jnp.bool_(policy(names))
    if policy == "none":
        return jnp.bool_(False)
    if policy == "all":
        return jnp.bool_(True)
    if role == "router":
        return jnp.bool_(False)
    if policy in ("experts", "ffa"):
        return jnp.bool_(True)
    if policy == "fedsa":
        return jnp.bool_(names[-1] == "a")
    if role == "shared":  # expert_0, expert_01: the attention LoRA belongs to the generalist
        return jnp.bool_(True)
    slots = jnp.arange(leaf.shape[1]) < (1 if policy == "expert_0" else 2)
    return slots.reshape((1, -1) + (1,) * (leaf.ndim - 2))


def global_mask(stacked_tree: PyTree, policy: Policy | Callable[[tuple[str, ...]], bool]) -> PyTree:
    """Per leaf, a boolean broadcastable to it: True where the tensor is averaged by the server
    (a variable's mask is held in a variable of its type, so the mask tree has the tree's
    structure)."""
    _check(policy)

    def mask(path, leaf):
        value = leaf.get_value() if _is_variable(leaf) else leaf
        m = _leaf_mask(path_names(path), leaf_role(leaf), value, policy)
        return leaf.replace(m) if _is_variable(leaf) else m

    return jax.tree_util.tree_map_with_path(mask, stacked_tree, is_leaf=_is_variable)


def merge_global(
    stacked_tree: PyTree, aggregated: PyTree, policy: Policy | Callable[[tuple[str, ...]], bool]
) -> PyTree:
    """`where(m, aggregated, stacked_tree)` leaf by leaf, `m = global_mask(stacked_tree, policy)`:
    the server's result on the global part, each client's own tensors elsewhere."""
    return jax.tree.map(jnp.where, global_mask(stacked_tree, policy), aggregated, stacked_tree)


def trainable(path: Sequence[Any], leaf: Any, policy: Policy) -> bool:
    """Whether the expert-side optimizer trains this (non-router) adapter leaf at `path` (an NNX
    filter's `(path, variable)`): everything except the frozen expert `A` of `ffa`."""
    _check(policy)
    frozen_a = leaf_role(leaf) == "experts" and path_names(path)[-1] == "a"
    return not (policy == "ffa" and frozen_a)


def masked_aggregator(
    policy: Policy | Callable[[tuple[str, ...]], bool] = "expert_0",
    weights: Real[ArrayLike, " n"] | None = None,
) -> Aggregator:
    """FedAvg of the `policy`'s global leaves; local leaves are kept. `inputs["weights"]`, when
    given, overrides the fixed `weights` (default uniform, the reference's 1/N mean). Stateless."""
    _check(policy)

    def apply(stacked_tree: PyTree, state: tuple, inputs: Inputs | None = None):
        averaged = fedavg(stacked_tree, (inputs or {}).get("weights", weights))
        return merge_global(stacked_tree, averaged, policy), state

    return Aggregator(lambda stacked_tree: (), apply)
