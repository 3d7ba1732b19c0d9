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

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

STRATEGIES = ("vmap", "map", "chunked", "sharded")
CLIENT_AXIS = "clients"
MODEL_AXIS = "model"

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How clients are mapped. `chunk_size` is for `chunked`; `inner`, `num_devices` (default:
    all devices) and `model_devices` (devices sharing one client group's base, the `model` mesh
    axis; 1: base replicated) for `sharded`."""

    kind: Literal["vmap", "map", "chunked", "sharded"] = "map"
    chunk_size: int = 4
    inner: Literal["map", "vmap"] = "map"
    num_devices: int | None = None
    model_devices: int = 1

    def __post_init__(self):
        if self.kind not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.kind!r}; choose one of {STRATEGIES}")
        if self.kind == "chunked" and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.inner not in ("map", "vmap"):
            raise ValueError(f"inner must be 'map' or 'vmap', got {self.inner!r}")
        if self.model_devices < 1:
            raise ValueError(f"model_devices must be >= 1, got {self.model_devices}")
        if self.model_devices > 1 and self.kind != "sharded":
            raise ValueError(
                f"model_devices={self.model_devices} shards the base over a device mesh, which "
                "only strategy.kind='sharded' uses; set kind: sharded or model_devices: 1"
            )

    def mesh(self) -> Mesh:
        """The `(clients, model)` mesh over the first `num_devices` devices (all processes'
        devices in a multi-host run), `model_devices` consecutive devices per client group."""
        devices = jax.devices()
        n = self.num_devices or len(devices)
        if n > len(devices):
            raise ValueError(f"strategy asks for {n} devices but only {len(devices)} are visible")
        if n % self.model_devices:
            raise ValueError(
                f"{n} devices cannot form groups of model_devices={self.model_devices}; choose a "
                "divisor of the device count"
            )
        grid = np.asarray(devices[:n]).reshape(n // self.model_devices, self.model_devices)
        return Mesh(grid, (CLIENT_AXIS, MODEL_AXIS))

    def check_clients(self, num_clients: int) -> None:
        """Raises when the client count cannot be split as this strategy needs."""
        if self.kind == "sharded":
            n = self.mesh().shape[CLIENT_AXIS]
            if num_clients % n:
                raise ValueError(
                    f"strategy 'sharded' splits {num_clients} clients over {n} client groups of "
                    f"devices; choose a client count divisible by {n} or set strategy.num_devices "
                    "(or strategy.model_devices)"
                )

    def client_sharding(self) -> NamedSharding | None:
        """Sharding of a stacked client array (client axis over the mesh), or None."""
        if self.kind != "sharded":
            return None
        return NamedSharding(self.mesh(), PartitionSpec(CLIENT_AXIS))

    def place(self, tree: PyTree) -> PyTree:
        """Puts a stacked client tree on devices as this strategy wants it (`sharded`: the client
        axis over the mesh's `clients` axis)."""
        sharding = self.client_sharding()
        return tree if sharding is None else jax.tree.map(lambda x: put(x, sharding), tree)

    def replicate(self, tree: PyTree) -> PyTree:
        """`sharded`: every leaf replicated on the mesh (shared data: reference sequences, a
        replicated base); other strategies: unchanged."""
        if self.kind != "sharded":
            return tree
        sharding = NamedSharding(self.mesh(), PartitionSpec())
        return jax.tree.map(lambda x: put(x, sharding), tree)

    def place_base(self, base: PyTree) -> PyTree:
        """The frozen base on the mesh (`sharded` only): replicated when `model_devices == 1`,
        else every weight sharded over the `model` axis along its largest axis divisible by
        `model_devices` (replicated when none is, e.g. biases of odd width)."""
        if self.kind != "sharded" or self.model_devices == 1:
            return self.replicate(base)
        mesh, m = self.mesh(), self.model_devices

        def place(x):
            axes = [a for a in range(x.ndim) if x.shape[a] % m == 0 and x.shape[a] >= m]
            spec = [None] * x.ndim
            if axes:
                spec[max(reversed(axes), key=lambda a: x.shape[a])] = MODEL_AXIS
            return put(x, NamedSharding(mesh, PartitionSpec(*spec)))

        return jax.tree.map(place, base)


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
