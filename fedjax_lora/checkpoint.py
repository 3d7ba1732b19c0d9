"""Checkpoints of a whole simulation with orbax: save every K rounds, keep the last k, resume
exactly, and fall back past a corrupt or partial checkpoint.

What is saved is the complete `SimState` (stacked adapters and routers, optimizer states, RNG keys,
counters, expert assignments, aggregator state, round) as a flat list of arrays — PRNG keys as
their raw key data — plus the metric records so far and a SHA-256 checksum of both as JSON. The
tree structure is not stored: it comes from the algorithm's own `init`, so a restore is checked
leaf by leaf (shape and dtype) against what the run expects. Orbax writes each step to a temporary
directory and renames it when complete, so a run killed mid-write leaves no finalized partial
step. Each checkpoint records the state layout it was written with (`STATE_LAYOUT`); one of
another layout is refused in one line instead of being restored leaf by leaf.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedjax_lora.errors import CheckpointError, one_line
from fedjax_lora.typing import PyTree

log = logging.getLogger(__name__)


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the run resuming from it."""


STATE_LAYOUT = 2
"""The version of `SimState`'s layout that checkpoints are written with. 2: every client's
frozen state (expert masks, rank scales) in `ClientState.frozen`; 1 (unrecorded): CoMiGS's
masks and HetLoRA's and FlexLoRA's rank scales among the adapters."""


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


def _is_closed_loop_noise(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


@contextlib.contextmanager
def _quiet_aborted_io():
    """Drops the "Event loop is closed" noise orbax's aborted asynchronous reads and writes leave
    behind when a corrupt checkpoint or a failed write stops them (collected here, not printed
    later as a traceback)."""
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


def _drop_closed_loop_tracebacks() -> None:
    """After a failed write, array writes still in flight complete into orbax's closed event loop
    and their callbacks report "Event loop is closed" (as unraisable errors or through
    `sys.excepthook`), possibly after the run has stopped: from then on such errors are dropped
    (any other error is reported as before)."""
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def unraisable_hook(u):
        if not _is_closed_loop_noise(u.exc_value):
            unraisable(u)

    def except_hook(kind, error, tb):
        if not _is_closed_loop_noise(error):
            excepthook(kind, error, tb)

    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


class _DropThreadTracebacks(logging.Filter):
    """Drops orbax's log of an exception in one of its writer threads: the same exception is
    raised in the caller (`save`), which reports it as one line; a failed write also leaves
    later writer threads failing at exit ("cannot schedule new futures after shutdown")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in str(record.msg)


_ABSL_FILTER = _DropThreadTracebacks()


def _remove_partial(directory: Path, round_idx: int, settle: float = 0.5, limit: float = 30.0):
    """Removes what a failed write left of step `round_idx` (its temporary directory, or the step
    if it was already renamed). Array writes still in flight may recreate files after a removal:
    it repeats until nothing has reappeared for `settle` seconds (at most `limit` seconds)."""
    start = quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < settle and time.monotonic() - start < limit:
        partial = [
            p for p in directory.glob(f"{round_idx}*") if p.name.split(".")[0] == str(round_idx)
        ]
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
        if partial:
            quiet_since = time.monotonic()
        time.sleep(settle / 5)


def _write_failure(directory: Path, round_idx: int, error: BaseException) -> CheckpointError:
    """The one-line error of a checkpoint write that failed, with the fix for its cause."""
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC or "No space left" in str(error):
        fix = "free disk space there (or lower checkpoint.keep)"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make it writable"
    else:
        fix = "check that it is writable and has free space"
    return CheckpointError(
        f"could not write the checkpoint of round {round_idx} to {directory} ({one_line(error)}): "
        f"{fix}, then continue with --resume from the last complete checkpoint"
    )


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
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,  # partial steps of an interrupted or failed write
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        logging.getLogger("absl").addFilter(_ABSL_FILTER)

    def save(self, round_idx: int, state: PyTree, records: list[dict[str, Any]]) -> None:
        """Saves the state after round `round_idx` and the metric records up to it.

        A write that fails (disk full, directory not writable) raises one `CheckpointError`
        naming the directory and the fix; what it wrote of this round is removed, so the
        previous checkpoint stays the one `--resume` continues from.
        """
        arrays = _to_saveable(state)
        items = {str(i): a for i, a in enumerate(arrays)}
        meta = {"records": records, "sha256": checksum(arrays, records), "layout": STATE_LAYOUT}
        try:
            with _quiet_aborted_io():
                self._manager.save(
                    round_idx,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(items), records=ocp.args.JsonSave(meta)
                    ),
                )
                self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - any write failure: one line, no partial step
            _drop_closed_loop_tracebacks()
            with contextlib.suppress(Exception), _quiet_aborted_io():
                self._manager.close()
            _remove_partial(self.directory, round_idx)
            raise _write_failure(self.directory, round_idx, e) from None

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
                with _quiet_aborted_io():
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
            layout = meta.get("layout", 1)
            if layout != STATE_LAYOUT:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory}/{step} has state layout {layout}, this version "
                    f"of fedjax_lora writes layout {STATE_LAYOUT} (clients' frozen state moved to "
                    "ClientState.frozen) and cannot resume it; rerun without --resume in another "
                    "output directory"
                )
            return step, _from_saved(arrays, template), records
        return None

    def close(self) -> None:
        self._manager.close()
