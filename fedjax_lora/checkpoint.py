"""Checkpoints of a whole simulation with orbax: save every K rounds, keep the last k, resume
exactly, and fall back past a corrupt or partial checkpoint.

What is saved is the complete `SimState` (stacked adapters and routers, optimizer states, RNG keys,
counters, expert assignments, aggregator state, round) as a flat list of arrays — PRNG keys as
their raw key data — plus the metric records so far and a SHA-256 checksum of both as JSON. The
tree structure is not stored: it comes from the algorithm's own `init`, so a restore is checked
leaf by leaf (shape and dtype) against what the run expects. Orbax writes each step to a temporary
directory and renames it when complete, so a run killed mid-write leaves no finalized partial
step.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedjax_lora.errors import CheckpointError, one_line

PyTree = Any
log = logging.getLogger(__name__)


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the run resuming from it."""


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(state: PyTree) -> list[np.ndarray]:
    return [np.asarray(jax.random.key_data(x) if _is_key(x) else x) for x in jax.tree.leaves(state)]


def _from_saved(arrays: list[np.ndarray], template: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(template)
    if len(arrays) != len(leaves):
        raise CheckpointMismatchError(
            f"checkpoint holds {len(arrays)} arrays but this run's state has {len(leaves)}; it was "
            "written by a different method or configuration — use another output directory"
        )
    restored = []
    for i, (saved, like) in enumerate(zip(arrays, leaves, strict=True)):
        if _is_key(like):
            expected = jax.random.key_data(like)
            value = jax.random.wrap_key_data(jnp.asarray(saved, expected.dtype))
        else:
            expected, value = like, saved
        if tuple(saved.shape) != tuple(expected.shape) or saved.dtype != expected.dtype:
            raise CheckpointMismatchError(
                f"checkpoint array {i} is {saved.dtype}{tuple(saved.shape)} but this run expects "
                f"{expected.dtype}{tuple(expected.shape)}; the configuration changed since it was "
                "written — use another output directory"
            )
        sharding = getattr(like, "sharding", None)
        restored.append(jax.device_put(value, sharding) if sharding is not None else value)
    return jax.tree.unflatten(treedef, restored)


@contextlib.contextmanager
def _quiet_failed_reads():
    """Drops the "Event loop is closed" noise orbax's aborted asynchronous reads leave behind
    when a corrupt checkpoint fails (collected here, not printed later as a traceback)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, RuntimeError):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


def checksum(arrays: list[np.ndarray], records: list[dict[str, Any]]) -> str:
    """SHA-256 of a checkpoint's arrays (dtype, shape, bytes) and records (canonical JSON), saved
    with it and verified on restore: a flipped bit is an unreadable checkpoint."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    digest.update(json.dumps(records, sort_keys=True).encode())
    return digest.hexdigest()


class Checkpointer:
    """Checkpoints of one run (one method) under `directory`, keeping the last `keep`."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, round_idx: int, state: PyTree, records: list[dict[str, Any]]) -> None:
        """Saves the state after round `round_idx` and the metric records up to it."""
        arrays = _to_saveable(state)
        items = {str(i): a for i, a in enumerate(arrays)}
        meta = {"records": records, "sha256": checksum(arrays, records)}
        self._manager.save(
            round_idx,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(items), records=ocp.args.JsonSave(meta)
            ),
        )
        self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, template: PyTree) -> tuple[int, PyTree, list[dict[str, Any]]] | None:
        """`(round, state, records)` of the newest readable checkpoint, or None when there is none.

        A checkpoint that cannot be read (corrupt, truncated, records missing, contents not
        matching the saved checksum) is reported and skipped in favour of the previous one; a
        checkpoint of another configuration raises `CheckpointMismatchError`.
        """
        for step in reversed(self.steps()):
            try:
                with _quiet_failed_reads():
                    restored = self._manager.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(), records=ocp.args.JsonRestore()
                        ),
                    )
                items, meta = restored["state"], restored["records"]
                arrays = [np.asarray(items[str(i)]) for i in range(len(items))]
                records = meta["records"]
                if meta.get("sha256", checksum(arrays, records)) != checksum(arrays, records):
                    raise CheckpointError("its contents do not match the checksum saved with it")
            except Exception as e:  # noqa: BLE001 - any read failure means "unusable checkpoint"
                log.warning(
                    "checkpoint %s/%d is unreadable (%s); trying the one before",
                    self.directory,
                    step,
                    one_line(e),
                )
                continue
            return step, _from_saved(arrays, template), records
        return None

    def close(self) -> None:
        self._manager.close()
