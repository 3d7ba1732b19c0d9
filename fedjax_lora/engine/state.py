"""Per-client simulation state: one pytree with a leading client axis."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_lora.lora import init_adapters
from fedjax_lora.typing import PyTree


class ClientState(NamedTuple):
    """Everything a client owns, stacked over clients (`[N, ...]` on every leaf).

    params: trainable adapters (LoRA factors; later routers, prompts).
    opt_state: the client's optax state (moments, schedule counts).
    rng: evolving PRNG key (dropout, batch sampling).
    data_key: fixed PRNG key of the client's epoch permutations.
    step: local optimizer steps taken.
    windows_seen: training windows drawn so far (the epoch sampler's position).
    aux: method-specific per-client trained-side arrays (FDLoRA's private and fused adapters,
      CoMiGS's pending gradients, SCAFFOLD's control variates); `{}` when unused.
    frozen: per-client state that is not trained but parameterises the client's model: the
      `ClientFrozen` variables of the problem's model (`Problem.frozen`: CoMiGS's and FedAMoLE's
      `ExpertMask`s, HetLoRA's `RankScale`s), merged over the shared base for that client in
      training and evaluation; empty or None when the model has none.
    """

    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    data_key: jax.Array
    step: jax.Array
    windows_seen: jax.Array
    aux: dict[str, Any]
    frozen: Any = None


@functools.partial(jax.jit, static_argnames=("tx", "num_clients", "shared_init"))
def init_clients(
    template: nnx.State,
    tx: optax.GradientTransformation,
    num_clients: int,
    key: jax.Array,
    *,
    shared_init: bool = False,
    aux: dict[str, Any] | None = None,
    frozen: Any = None,
) -> ClientState:
    """N clients whose adapters are drawn from `template`'s init rules.

    shared_init: every client starts from the same draw (FedAvg-style); otherwise each client draws
    its own (the trust-weighted reference draws an independent A per client).
    """
    k_params, k_rng, k_data = jax.random.split(key, 3)
    param_keys = jax.random.split(k_params, num_clients)
    if shared_init:
        param_keys = jnp.broadcast_to(param_keys[:1], param_keys.shape)
    params = jax.vmap(init_adapters, in_axes=(None, 0))(template, param_keys)
    zeros = jnp.zeros((num_clients,), jnp.int32)
    return ClientState(
        params=params,
        opt_state=jax.vmap(tx.init)(params),
        rng=jax.random.split(k_rng, num_clients),
        data_key=jax.random.split(k_data, num_clients),
        step=zeros,
        windows_seen=zeros,
        aux=dict(aux or {}),
        frozen=frozen,
    )


def client_model_state(clients: ClientState) -> PyTree:
    """What parameterises each client's model beyond the shared base, stacked `[N, ...]`: its
    adapters (`ClientState.params`) with its frozen state (`ClientState.frozen`: expert masks,
    rank scales) merged in."""
    if not jax.tree.leaves(clients.frozen):
        return clients.params
    return nnx.merge_state(clients.params, clients.frozen)
