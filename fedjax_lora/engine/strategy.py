"""Client-parallel execution strategies over one per-client function.

The same per-client function runs over the leading client axis of its arguments as
- `vmap`: all clients at once (best on GPU/TPU; live activations grow with N),
- `map`: sequentially inside the compiled program (`lax.map`; best on small CPUs),
- `chunked`: `lax.map(batch_size=k)`, k clients vectorised at a time,
- `sharded`: the client axis split over a `jax.sharding.Mesh` axis with `shard_map`, each device
  running its local clients with `inner` (`map` or `vmap`).
A Python loop over clients never appears inside `jit`: compile time stays independent of N.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

STRATEGIES = ("vmap", "map", "chunked", "sharded")
CLIENT_AXIS = "clients"

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How clients are mapped. `chunk_size` is for `chunked`; `inner` and `num_devices` for
    `sharded` (default: all devices)."""

    kind: Literal["vmap", "map", "chunked", "sharded"] = "map"
    chunk_size: int = 4
    inner: Literal["map", "vmap"] = "map"
    num_devices: int | None = None

    def __post_init__(self):
        if self.kind not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.kind!r}; choose one of {STRATEGIES}")
        if self.kind == "chunked" and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.inner not in ("map", "vmap"):
            raise ValueError(f"inner must be 'map' or 'vmap', got {self.inner!r}")

    def mesh(self) -> Mesh:
        """A one-axis mesh named `clients` over the first `num_devices` devices."""
        devices = jax.devices()
        n = self.num_devices or len(devices)
        if n > len(devices):
            raise ValueError(f"strategy asks for {n} devices but only {len(devices)} are visible")
        return Mesh(np.asarray(devices[:n]), (CLIENT_AXIS,))

    def check_clients(self, num_clients: int) -> None:
        """Raises when the client count cannot be split as this strategy needs."""
        if self.kind == "sharded":
            n = self.mesh().size
            if num_clients % n:
                raise ValueError(
                    f"strategy 'sharded' splits {num_clients} clients over {n} devices; choose a "
                    f"client count divisible by {n} or set strategy.num_devices"
                )

    def client_sharding(self) -> NamedSharding | None:
        """Sharding of a stacked client array (client axis over the mesh), or None."""
        if self.kind != "sharded":
            return None
        return NamedSharding(self.mesh(), PartitionSpec(CLIENT_AXIS))

    def place(self, tree: PyTree) -> PyTree:
        """Puts a stacked client tree on devices as this strategy wants it."""
        sharding = self.client_sharding()
        return tree if sharding is None else jax.device_put(tree, sharding)


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
        check_vma=False,
    )
    return sharded(per_client, shared)
