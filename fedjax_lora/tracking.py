"""Experiment tracking: every round record goes to `metrics.jsonl`, TensorBoard event files
(tensorboardX) and, when installed and asked for, Weights & Biases; progress bars for long
host-side loops and for the per-client evaluations inside a compiled round."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

Record = dict[str, Any]


class Tracker(Protocol):
    def log(self, record: Record) -> None: ...

    def close(self) -> None: ...


def scalars(record: Record) -> dict[str, float]:
    """The scalar series of a round record: means (`val_mean_ppl`), per-client values
    (`val_ppl/client_3`), named `{method}/{metric}`."""
    method = record["method"]
    out = {}
    for key, value in record.items():
        if key in ("method", "round") or isinstance(value, str):
            continue
        if isinstance(value, int | float):
            out[f"{method}/{key}"] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            out.update({f"{method}/{key}/client_{i}": float(v) for i, v in enumerate(value)})
    return out


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (`null`): JSON has no NaN or
    Infinity, and a file holding them is not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class JsonlTracker:
    """One JSON object per line, flushed after every record."""

    def __init__(self, path: Path):
        self._file = open(path, "w")  # noqa: SIM115 - closed in close()

    def log(self, record: Record) -> None:
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardTracker:
    """Scalars at step = round, under `{method}/{metric}`."""

    def __init__(self, logdir: Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir))

    def log(self, record: Record) -> None:
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, record["round"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def require_wandb():
    """The `wandb` module, or a clear error saying how to get it."""
    try:
        import wandb
    except ImportError:
        raise ValueError(
            "tracking.wandb is on but the wandb package is not installed; "
            "`pip install wandb` or set tracking.wandb=false"
        ) from None
    return wandb


class WandbTracker:
    """A W&B run; `wandb` must be installed (`pip install wandb`)."""

    def __init__(self, project: str, config: dict[str, Any], directory: Path):
        self._run = require_wandb().init(project=project, config=config, dir=str(directory))

    def log(self, record: Record) -> None:
        self._run.log({**scalars(record), "round": record["round"]})

    def close(self) -> None:
        self._run.finish()


class Trackers:
    """Fans every record out to several trackers."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, record: Record) -> None:
        for t in self.trackers:
            t.log(record)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def open_trackers(
    out: Path, *, tensorboard: bool, wandb: bool, project: str, config: dict[str, Any]
) -> Trackers:
    """`metrics.jsonl` always; TensorBoard under `out/tensorboard`; W&B when asked for."""
    trackers: list[Tracker] = []
    try:
        if wandb:
            trackers.append(WandbTracker(project, config, out))
        if tensorboard:
            trackers.append(TensorBoardTracker(out / "tensorboard"))
        trackers.append(JsonlTracker(out / "metrics.jsonl"))
    except BaseException:
        Trackers(trackers).close()
        raise
    return Trackers(trackers)


def interactive() -> bool:
    """True when someone watches: stderr is a terminal, or the code runs in a Jupyter/Colab
    kernel with `ipywidgets` (where `tqdm.auto` draws widget bars; without it tqdm would print
    text fragments and a warning, so bars stay off: `pip install 'fedjax_lora[notebook]'`)."""
    if sys.stderr is not None and sys.stderr.isatty():
        return True
    shell = sys.modules.get("IPython")
    ipython = shell.get_ipython() if shell is not None else None
    in_kernel = ipython is not None and hasattr(ipython, "kernel")
    return in_kernel and importlib.util.find_spec("ipywidgets") is not None


def progress_bar(iterable: Iterable, *, enabled: bool = True, **tqdm_options: Any) -> tqdm:
    """`tqdm(iterable)` over rounds or a long host-side loop (cross-evaluations, per-client
    evaluations, a grid of runs), shown only when `enabled` (the config's `tracking.progress`,
    the CLI's `--no-progress`) and `interactive()`. It only wraps the iteration: the items, their
    order and every result are the same with or without it."""
    return tqdm(iterable, disable=_hidden(enabled), **tqdm_options)


def _hidden(enabled: bool) -> bool:
    """A bar stays hidden unless it is `enabled` and someone watches (`interactive()`)."""
    return not (enabled and interactive())


_EVALUATION_BAR: tqdm | None = None


@contextlib.contextmanager
def evaluation_progress(total: int, *, enabled: bool = True, **tqdm_options: Any) -> Iterator:
    """A progress bar for the evaluations of one compiled call (a round or `evaluate`): while
    open, every `ticking` function counts one client's evaluation on one set. Shown as
    `progress_bar` (`enabled` and `interactive()`); the call's results must reach the host inside
    the block."""
    global _EVALUATION_BAR
    bar = tqdm(total=total, disable=_hidden(enabled), **tqdm_options)
    _EVALUATION_BAR = bar
    try:
        yield bar
    finally:
        _EVALUATION_BAR = None
        bar.close()


def _tick(_: Any) -> None:
    if _EVALUATION_BAR is not None:
        _EVALUATION_BAR.update(1)


def ticking(fn: Callable) -> Callable:
    """`fn` (a per-client function inside `jit`) that also counts one step of the open
    `evaluation_progress` bar once its result is computed (`jax.debug.callback`, per client under
    `vmap`, `lax.map` and `shard_map` alike); results are unchanged."""
    import jax

    def counted(*args):
        out = fn(*args)
        jax.debug.callback(_tick, jax.tree.leaves(out)[0])
        return out

    return counted
