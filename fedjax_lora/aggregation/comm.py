r"""Communication accounting: the bytes one client uploads and downloads in one round.

Pure host-side counts over shapes and dtypes (arrays or `jax.ShapeDtypeStruct`s), for the
aggregation-level exchanges:

- `tree_bytes`: :math:`\sum_\ell \mathrm{size}(\ell) \cdot \mathrm{itemsize}(\ell)`;
- `global_exchange`: the global part of a stacked client tree under a mask policy
  (`aggregation.masks`), uploaded by each client and downloaded back (FedAvg, FedSA-LoRA's `A`,
  CoMiGS's generalist, FFA-LoRA's `B`...); a per-slot mask counts only its slots;
- `rank_exchange`: LoRA tensors truncated to rank `r` (HetLoRA, FlexLoRA): `A [.., d_in, r_max]`
  and `B [.., r_max, d_out]` count :math:`r (d_{in} + d_{out})` elements, other leaves in full;
- `logits_exchange`: prediction trust's logits on the shared reference set: one client's
  `[S, T, V]` (or `[S, V]`) up, the `N − 1` other clients' down;
- `model_exchange`: the `N × N` cross-evaluation of validation trust: one's model up, the
  `N − 1` others' down.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from fedjax_lora.aggregation.masks import Policy, global_mask, path_names

__all__ = [
    "Exchange",
    "global_exchange",
    "logits_exchange",
    "model_exchange",
    "rank_exchange",
    "tree_bytes",
]

PyTree = Any


class Exchange(NamedTuple):
    """Bytes one client sends (`upload`) and receives (`download`) in one round."""

    upload: int
    download: int


def _nbytes(shape: Sequence[int], dtype: Any) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def tree_bytes(tree: PyTree) -> int:
    """Total bytes of all leaves (arrays or `ShapeDtypeStruct`s)."""
    return sum(_nbytes(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(tree))


def global_exchange(
    stacked_tree: PyTree, policy: Policy | Callable[[tuple[str, ...]], bool] = "all"
) -> Exchange:
    """One client's global part of `stacked_tree` (leaves `[N, ...]`), up and down."""
    masks = global_mask(stacked_tree, policy)
    total = sum(
        int(np.broadcast_to(np.asarray(m), leaf.shape)[0].sum()) * np.dtype(leaf.dtype).itemsize
        for leaf, m in zip(jax.tree.leaves(stacked_tree), jax.tree.leaves(masks), strict=True)
    )
    return Exchange(total, total)


def rank_exchange(tree: PyTree, rank: int) -> Exchange:
    """One client's LoRA tree (no client axis) truncated to `rank`, up and down: leaves named
    `a` keep `rank` of their last axis, leaves named `b` of their second-to-last."""

    def leaf_bytes(path: Any, leaf: Any) -> int:
        name = path_names(path)[-1]
        axis = {"a": -1, "b": -2}.get(name)
        if axis is None:
            return _nbytes(leaf.shape, leaf.dtype)
        if rank > leaf.shape[axis]:
            raise ValueError(f"rank {rank} exceeds leaf {name!r}'s rank axis of {leaf.shape}")
        shape = list(leaf.shape)
        shape[axis] = rank
        return _nbytes(shape, leaf.dtype)

    total = sum(jax.tree.leaves(jax.tree_util.tree_map_with_path(leaf_bytes, tree)))
    return Exchange(total, total)


def logits_exchange(shape: Sequence[int], num_clients: int, dtype: Any = np.float32) -> Exchange:
    """Logits of `shape` on the reference set: one client's up, the `N − 1` others' down."""
    one = _nbytes(shape, dtype)
    return Exchange(one, (num_clients - 1) * one)


def model_exchange(model_bytes: int, num_clients: int) -> Exchange:
    """The `N × N` cross-evaluation: one's model (`model_bytes`) up, `N − 1` models down."""
    return Exchange(model_bytes, (num_clients - 1) * model_bytes)
