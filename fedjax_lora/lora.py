"""LoRA adapters on frozen projections, as separate trainable pytrees.

A LoRA on a projection `y = x W + b` adds `s · dropout(x) A B` with `A: (in, r)`, `B: (r, out)`,
`B = 0` at init (Hu et al., 2021), and `s = alpha / r` or `alpha / sqrt(r)` (rsLoRA; CoMiGS).
Adapters are `Adapter` variables, so `split(model)` gives `(graphdef, adapters, base)`: the base is
held once, and adapters can be stacked on a leading client axis (`init_adapters` under `vmap`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora.models.layers import Adapter, Linear, dropout
from fedjax_lora.settings import LoRAConfig

__all__ = [
    "Adapter",
    "Init",
    "LoRA",
    "LoRAConfig",
    "add_lora",
    "attach_adapters",
    "detach_adapters",
    "init_adapters",
    "merge",
    "projection_paths",
    "split",
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Init:
    """How an adapter variable is (re)drawn; kept as the variable's metadata.

    kinds: `"zeros"`; `"uniform"` on `[-bound, bound]`; `"normal"` with standard deviation `std`;
    `"fixed"`: the value the variable already holds (a soft prompt copied from token embeddings).
    """

    kind: Literal["zeros", "uniform", "normal", "fixed"]
    bound: float = 0.0
    std: float = 0.0

    def __post_init__(self):
        if self.kind not in ("zeros", "uniform", "normal", "fixed"):
            raise ValueError(f"unknown init kind {self.kind!r}")

    def scale(self, standard: jax.Array) -> jax.Array:
        """Maps a standard draw (U(-1, 1) for `uniform`, N(0, 1) for `normal`) to this rule."""
        if self.kind == "zeros":
            return jnp.zeros_like(standard)
        return standard * (self.bound if self.kind == "uniform" else self.std)


class LoRA(nnx.Module):
    """`delta(x) = scale · dropout(x) @ a @ b`, computed in the adapter dtype (f32 by default)."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig):
        dtype = jnp.dtype(config.dtype)
        # Host zeros; `add_lora` draws every adapter at once with `init_adapters`.
        self.a = Adapter(
            np.zeros((in_features, config.rank), dtype), init=config.a_init(in_features)
        )
        self.b = Adapter(np.zeros((config.rank, out_features), dtype), init=Init("zeros"))
        self.scale = config.scale
        self.dropout = config.dropout

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        a, b = self.a[...], self.b[...]
        h = dropout(x.astype(a.dtype), self.dropout, rngs)
        return self.scale * ((h @ a) @ b)


def _path_str(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def projection_paths(model: nnx.Module) -> dict[str, tuple[Linear, str]]:
    """Every adapter slot of the model: `{"transformer.h.0.attn.c_attn.q": (linear, "q"), ...}`."""
    slots = {}
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Linear):
            base = _path_str(path)
            for slot in module.slot_names():
                slots[base if slot == "" else f"{base}.{slot}"] = (module, slot)
    return slots


def _matches(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return path == pattern or path.endswith("." + pattern)


def add_lora(model: nnx.Module, config: LoRAConfig, *, key: jax.Array | None = None) -> list[str]:
    """Attaches a LoRA to every projection slot matching `config.targets`, in place, and draws
    all of the model's adapters from `key` (`init_adapters`).

    Returns the adapted paths. Raises if a pattern matches nothing (naming the available
    projections), if a slot already holds an adapter, or if a projection would get LoRA both on its
    whole output and on one of its slices.
    """
    make = lambda in_features, out_features: LoRA(in_features, out_features, config)
    return attach_adapters(model, config.targets, make, key=key)


def attach_adapters(
    model: nnx.Module,
    targets: Sequence[str],
    make: Callable[[int, int], nnx.Module],
    *,
    key: jax.Array | None = None,
    replace: bool = False,
) -> list[str]:
    """Puts `make(in_features, slot_width)` into every projection slot matching `targets` (the
    `LoRAConfig.targets` rule), in place, then draws all of the model's adapters from `key`
    (`init_adapters`). Any adapter module (LoRA, a mixture of LoRA experts) installs this way.

    Returns the adapted paths. Raises if a pattern matches nothing (naming the available
    projections), if a slot already holds an adapter (unless `replace`: the new one takes its
    place), or if a projection would get an adapter both on its whole output and on one of its
    slices.
    """
    key = jax.random.key(0) if key is None else key
    slots = projection_paths(model)
    chosen: dict[str, tuple[Linear, str]] = {}
    for pattern in targets:
        hits = {p: s for p, s in slots.items() if _matches(pattern, p)}
        if not hits:
            names = sorted({re.sub(r"\.\d+\.", ".*.", p) for p in slots})
            raise ValueError(
                f"adapter target {pattern!r} matches no projection of this model; available "
                f"projections: {names}"
            )
        chosen.update(hits)
    by_linear: dict[int, set[str]] = {}
    for linear, slot in chosen.values():
        by_linear.setdefault(id(linear), set()).add(slot)
    for slots_of_linear in by_linear.values():
        if "" in slots_of_linear and len(slots_of_linear) > 1:
            raise ValueError(
                "adapter targets select both a fused projection and one of its slices "
                f"({sorted(s for s in slots_of_linear if s)}); choose one of the two"
            )
    for path, (linear, slot) in sorted(chosen.items()):
        attr = Linear.slot_attr(slot)
        if getattr(linear, attr, None) is not None and not replace:
            raise ValueError(f"projection {path!r} already holds an adapter")
        setattr(linear, attr, make(linear.in_features, linear.slot_width(slot)))
    nnx.update(model, jax.jit(init_adapters)(nnx.state(model, Adapter), key))
    return sorted(chosen)


def detach_adapters(model: nnx.Module) -> None:
    """Removes every adapter from every projection slot, in place (back to the bare base)."""
    for _, linear in nnx.iter_graph(model):
        if isinstance(linear, Linear):
            for slot in linear.slot_names():
                if hasattr(linear, Linear.slot_attr(slot)):
                    delattr(linear, Linear.slot_attr(slot))


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, adapters, base)`: the trainable `Adapter` variables and the frozen rest."""
    return nnx.split(model, Adapter, ...)


def merge(graphdef: nnx.GraphDef, adapters: PyTree, base: nnx.State) -> nnx.Module:
    """Rebuilds a callable model from its parts (inside `jit`, a trace-time operation)."""
    return nnx.merge(graphdef, adapters, base)


def init_adapters(adapters: nnx.State, key: jax.Array) -> nnx.State:
    """Redraws every adapter variable from its `Init` metadata (`fixed` ones keep their value);
    pure and `vmap`-able over keys.

    All leaves come from two draws (one U(-1, 1) and one N(0, 1) vector covering every uniform and
    normal leaf, cut in flattened leaf order), so compiling it costs two random ops whatever the
    model size. `vmap(init_adapters, (None, 0))(t, keys)` gives independent per-client draws; one
    key broadcast gives identical (shared) init.
    """
    flat = list(nnx.to_flat_state(adapters))
    inits = [var.get_metadata()["init"] for _, var in flat]
    sizes = [var.get_value().size for _, var in flat]
    k_uniform, k_normal = jax.random.split(key)
    pools = {
        "uniform": jax.random.uniform(
            k_uniform,
            (sum(n for n, i in zip(sizes, inits, strict=True) if i.kind == "uniform"),),
            minval=-1.0,
            maxval=1.0,
        ),
        "normal": jax.random.normal(
            k_normal, (sum(n for n, i in zip(sizes, inits, strict=True) if i.kind == "normal"),)
        ),
    }
    offsets = {"uniform": 0, "normal": 0}
    drawn = []
    for (path, var), init, size in zip(flat, inits, sizes, strict=True):
        value = var.get_value()
        if init.kind == "zeros":
            new = jnp.zeros(value.shape, value.dtype)
        elif init.kind == "fixed":
            new = jnp.asarray(value)
        else:
            start = offsets[init.kind]
            offsets[init.kind] = start + size
            standard = pools[init.kind][start : start + size].reshape(value.shape)
            new = init.scale(standard).astype(value.dtype)
        drawn.append((path, var.replace(new)))
    return nnx.from_flat_state(drawn)
