"""Client-parallel execution strategies over one per-client function.

The same per-client function runs over the leading client axis of its arguments as
- `vmap`: all clients at once (best on GPU/TPU; live activations grow with N),
- `map`: sequentially inside the compiled program (`lax.map`; best on small CPUs),
- `chunked`: `lax.map(batch_size=k)`, k clients vectorised at a time,
- `sharded`: the client axis split over the `clients` axis of a `jax.sharding.Mesh` with
  `shard_map`, each device group running its local clients with `inner` (`map` or `vmap`).

The `sharded` mesh is two-dimensional, `(clients, model)` of shape `(D / M, M)` for `D` devices
and `M = model_devices`. With `M = 1` the base is replicated on every device. With `M > 1` the
base's weights are sharded over the `model` axis (`place_base`: each weight split along its
largest axis divisible by `M`, e.g. the vocabulary of the embedding, the output features of a
kernel); `shard_map` is manual over `clients` only, so inside one client group XLA's SPMD
partitioner splits every matmul with the base over the group's `M` devices and inserts the
collectives. Aggregation runs in the same compiled round on the client-sharded arrays (the
cross-client mean or mixing becomes an all-reduce / all-gather over `clients`).
A Python loop over clients never appears inside `jit`: compile time stays independent of N.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fedjax_lora.settings import CLIENT_AXIS, MODEL_AXIS, STRATEGIES, Strategy

__all__ = ["CLIENT_AXIS", "MODEL_AXIS", "STRATEGIES", "Strategy", "map_clients", "put"]

PyTree = Any


def put(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """`x` (the same host value in every process) as a global array with `sharding`: a plain
    `device_put` in one process; with several processes (`jax.distributed`) each process fills
    only the shards on its own devices (`jax.make_array_from_callback`). PRNG key arrays travel
    as their key data."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _sequential(fn: Callable, per_client: PyTree, batch_size: int | None) -> PyTree:
    return jax.lax.map(lambda args: fn(*args), per_client, batch_size=batch_size)


def map_clients(
    fn: Callable[..., PyTree], strategy: Strategy, per_client: tuple, shared: tuple = ()
) -> PyTree:
    """`fn(*client_args, *shared)` for every client; `per_client` leaves carry the client axis.

    Returns the stacked outputs (leading client axis). Must be called inside `jit`.
    """

    def one(*args):
        return fn(*args, *shared)

    if strategy.kind == "vmap":
        return jax.vmap(one)(*per_client)
    if strategy.kind == "map":
        return _sequential(one, per_client, None)
    if strategy.kind == "chunked":
        return _sequential(one, per_client, strategy.chunk_size)

    def local(client_args, shared_args):
        run = lambda *a: fn(*a, *shared_args)
        if strategy.inner == "vmap":
            return jax.vmap(run)(*client_args)
        return _sequential(run, client_args, None)

    spec, replicated = PartitionSpec(CLIENT_AXIS), PartitionSpec()
    sharded = jax.shard_map(
        local,
        mesh=strategy.mesh(),
        in_specs=(
            jax.tree.map(lambda _: spec, per_client),
            jax.tree.map(lambda _: replicated, shared),
        ),
        out_specs=spec,
        axis_names=frozenset({CLIENT_AXIS}),
        check_vma=False,
    )
    return sharded(per_client, shared)
