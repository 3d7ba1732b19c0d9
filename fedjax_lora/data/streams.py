"""Per-client token streams: the padded `ClientTokens` layout, evaluation windows, and on-disk
memmapped streams.

A client's data is one flat token stream (documents concatenated). `ClientTokens` stacks the N
streams right-padded with 0 into `tokens [N, L]`, with the true `lengths [N]`. A training or
evaluation window is `tokens[i, s : s + T + 1]`; its inputs are the first T tokens and its targets
the last T. `loss_mask[i, j] = 1` where token j counts as a *target* (e.g. only the response of an
instruction example).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedjax_lora.errors import DataError, one_line

UINT16_MAX_VOCAB = 1 << 16


class ClientTokens(NamedTuple):
    """N clients' token streams, right-padded with 0."""

    tokens: np.ndarray  # int32 [N, L]
    lengths: np.ndarray  # int32 [N]
    loss_mask: np.ndarray | None  # uint8 [N, L]: 1 where the token counts as a target; None = all

    @property
    def num_clients(self) -> int:
        return int(self.tokens.shape[0])

    def stream(self, i: int) -> np.ndarray:
        """Client `i`'s unpadded token stream."""
        return self.tokens[i, : self.lengths[i]]


class MaskedStream(NamedTuple):
    """One token stream with its target mask (1 where the token counts as a target)."""

    tokens: np.ndarray  # int [L]
    loss_mask: np.ndarray  # uint8 [L]


def stack_streams(
    streams: Sequence[np.ndarray], loss_masks: Sequence[np.ndarray] | None = None
) -> ClientTokens:
    """Stack 1-D token streams (one per client) into a right-padded `ClientTokens`."""
    arrays = [np.asarray(s) for s in streams]
    for i, s in enumerate(arrays):
        if s.ndim != 1:
            raise ValueError(f"client {i}: token stream must be 1-D, got shape {s.shape}")
    n = len(arrays)
    lengths = np.array([s.shape[0] for s in arrays], dtype=np.int32)
    width = int(lengths.max()) if n else 0
    tokens = np.zeros((n, width), dtype=np.int32)
    for i, s in enumerate(arrays):
        tokens[i, : s.shape[0]] = s
    mask = None
    if loss_masks is not None:
        if len(loss_masks) != n:
            raise ValueError(f"got {len(loss_masks)} loss masks for {n} streams")
        mask = np.zeros((n, width), dtype=np.uint8)
        for i, m in enumerate(loss_masks):
            m = np.asarray(m)
            if m.shape != arrays[i].shape:
                raise ValueError(
                    f"client {i}: loss mask shape {m.shape} != token stream shape {arrays[i].shape}"
                )
            mask[i, : m.shape[0]] = m
    return ClientTokens(tokens, lengths, mask)


def split_tail(ct: ClientTokens, fraction: float) -> tuple[ClientTokens, ClientTokens]:
    """`(head, tail)`: each client's stream cut so the last `fraction` of its tokens (at least one)
    form the tail, e.g. FedAMoLE's auxiliary split held out of training (5 %)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"tail fraction must be in (0, 1), got {fraction}")
    heads, tails, head_masks, tail_masks = [], [], [], []
    for i in range(ct.num_clients):
        n = int(ct.lengths[i])
        cut = n - max(int(round(n * fraction)), 1)
        heads.append(ct.tokens[i, :cut])
        tails.append(ct.tokens[i, cut:n])
        if ct.loss_mask is not None:
            head_masks.append(ct.loss_mask[i, :cut])
            tail_masks.append(ct.loss_mask[i, cut:n])
    masks = ct.loss_mask is not None
    return (
        stack_streams(heads, head_masks if masks else None),
        stack_streams(tails, tail_masks if masks else None),
    )


def _client_label(i: int, names: Sequence[str] | None) -> str:
    return f"client {i} ({names[i]!r})" if names is not None else f"client {i}"


def eval_window_starts(
    lengths: np.ndarray,
    seq_len: int,
    max_windows: int,
    names: Sequence[str] | None = None,
    *,
    stride: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Start positions of a fixed set of evaluation windows per client.

    Client i's stream holds `n_i = (length_i - 1) // seq_len` windows of `seq_len + 1` tokens at
    stride `seq_len` (consecutive windows share only their boundary token, so every target is
    counted at most once), or, with `stride = seq_len + 1` (streams of one-example slots,
    `data.instruction_packing=examples`), its `n_i = length_i // (seq_len + 1)` slots. If
    `n_i > max_windows`, `W = max_windows` of those slots are taken
    evenly spread over the stream (slot `floor(k * n_i / W)`, k = 0..W-1). Returns
    `starts int32 [N, W]` and `valid bool [N, W]`; clients with fewer windows are padded with
    start 0 and marked invalid. Deterministic: no randomness.
    """
    if seq_len < 1 or max_windows < 1:
        raise ValueError(f"seq_len and max_windows must be >= 1, got {seq_len}, {max_windows}")
    lengths = np.asarray(lengths, dtype=np.int64)
    stride = seq_len if stride is None else stride
    slots = (lengths - seq_len - 1) // stride + 1
    for i, length in enumerate(lengths):
        if slots[i] < 1:
            raise ValueError(
                f"{_client_label(i, names)} has {length} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1} needed for one evaluation window; give it more data or use a "
                "smaller seq_len"
            )
    width = int(min(max_windows, slots.max())) if len(lengths) else 0
    starts = np.zeros((len(lengths), width), dtype=np.int32)
    valid = np.zeros((len(lengths), width), dtype=bool)
    for i, n in enumerate(slots):
        w = int(min(n, width))
        slot = (np.arange(w, dtype=np.int64) * n) // w
        starts[i, :w] = slot * stride
        valid[i, :w] = True
    return starts, valid


def gather_windows(array: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """`array[i, starts[i, w] : starts[i, w] + width]` for every client i and window w."""
    offsets = starts[..., None].astype(np.int64) + np.arange(width)
    return np.take_along_axis(array, offsets.reshape(array.shape[0], -1), axis=1).reshape(
        offsets.shape
    )


def eval_windows(
    ct: ClientTokens,
    seq_len: int,
    max_windows: int,
    names: Sequence[str] | None = None,
    *,
    stride: int | None = None,
    masked: bool = False,
) -> tuple[np.ndarray, ...]:
    """A fixed, reproducible set of evaluation windows per client.

    Returns `windows int32 [N, W, seq_len + 1]` (see `eval_window_starts` for which, and
    `stride`) and `valid bool [N, W]`; invalid (padding) windows are all zeros. With `masked`,
    also the target weights `f32 [N, W, seq_len]` of the same windows (the stream's loss mask
    at the targets; all ones without one), so the loss counts only the masked tokens (an
    instruction example's response). `names` only improves error messages.
    """
    starts, valid = eval_window_starts(ct.lengths, seq_len, max_windows, names, stride=stride)
    windows = gather_windows(ct.tokens, starts, seq_len + 1).astype(np.int32)
    windows[~valid] = 0
    if not masked:
        return windows, valid
    if ct.loss_mask is None:
        return windows, valid, np.ones(windows[..., 1:].shape, np.float32)
    mask = gather_windows(ct.loss_mask, starts, seq_len + 1)[..., 1:].astype(np.float32)
    return windows, valid, mask


def stream_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= UINT16_MAX_VOCAB else np.uint32)


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar next to a stream file: `<path>.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_stream(path: str | Path, tokens: np.ndarray, vocab_size: int) -> Path:
    """Write a flat token stream as raw uint16/uint32 plus a JSON sidecar; returns `path`.

    The raw file has no header (readable by nanoGPT-style `np.memmap` code); the sidecar holds
    `{"dtype", "length", "vocab_size"}`.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"token stream must be 1-D, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got range "
            f"[{int(tokens.min())}, {int(tokens.max())}] (vocabulary mismatch?)"
        )
    dtype = stream_dtype(vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens.astype(dtype).tofile(path)
    meta = {"dtype": dtype.name, "length": int(tokens.shape[0]), "vocab_size": int(vocab_size)}
    sidecar_path(path).write_text(json.dumps(meta))
    return path


def open_stream(path: str | Path) -> np.memmap | np.ndarray:
    """Memory-map a stream written by `write_stream` (read-only), using its JSON sidecar."""
    path = Path(path)
    meta_path = sidecar_path(path)
    if not meta_path.exists():
        raise FileNotFoundError(
            f"no sidecar {meta_path} for token stream {path}; write streams with write_stream()"
        )
    try:
        meta = json.loads(meta_path.read_text())
        dtype, length = np.dtype(meta["dtype"]), meta["length"]
        if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int32)):
            raise ValueError(f"dtype {dtype.name} is not an integer token type (uint16/uint32)")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length {length!r} is not a count")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataError(
            f"sidecar {meta_path} of token stream {path} is not usable ({type(e).__name__}: "
            f'{one_line(e)}); it needs {{"dtype": "uint16"|"uint32", "length": N}} '
            "as write_stream() writes it"
        ) from None
    expected = length * dtype.itemsize
    if path.stat().st_size != expected:
        raise DataError(
            f"{path} has {path.stat().st_size} bytes but its sidecar says {meta['length']} "
            f"{dtype.name} tokens ({expected} bytes); the file is truncated or stale"
        )
    if meta["length"] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["length"],))


def reference_windows(stream: np.ndarray, num_sequences: int, length: int) -> np.ndarray:
    """`num_sequences` fixed, evenly spread, non-overlapping windows of `length` tokens from one
    stream: the shared reference set `int32 [S, T]` for prediction-similarity trust."""
    stream = np.asarray(stream)
    slots = stream.shape[0] // length
    if slots < num_sequences:
        raise ValueError(
            f"reference stream has {stream.shape[0]} tokens, fewer than {num_sequences} x "
            f"{length} needed; give it more data or ask for fewer/shorter sequences"
        )
    starts = (np.arange(num_sequences, dtype=np.int64) * slots // num_sequences) * length
    return stream[starts[:, None] + np.arange(length)].astype(np.int32)
