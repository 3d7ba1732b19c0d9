"""`FederatedData`: every client's train/val/test token streams plus ground truth, and
`build_federated` to assemble it from per-client texts or token streams."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_lora.data.partition import check_proportions
from fedjax_lora.data.streams import ClientTokens, MaskedStream, stack_streams
from fedjax_lora.data.tokenize import Separator, check_vocab, tokenize_texts

SPLITS = ("train", "val", "test")

# One client's data in one split: documents (tokenized on build), a token stream, or a stream
# with a target mask.
SplitSource = Sequence[str] | np.ndarray | MaskedStream
# One client's data: a SplitSource cut by fractions, or explicit {"train", "val"[, "test"]}.
ClientSource = SplitSource | Mapping[str, SplitSource]


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
    """The data of N clients.

    `groups int [N]` is each client's ground-truth group/category (the argmax category for mixed
    clients); `mixtures [N, K]` the known data proportions (oracle trust), if known;
    `shared_eval` named shared evaluation streams (out-of-distribution settings); `reference`
    the shared reference sequences `int32 [S, T]` for prediction-similarity trust; `task` the
    clients' test examples for the instruction-task evaluation
    (`fedjax_lora.data.instruction.TaskExamples`), if any; `aux` every client's auxiliary split
    held out of training (FedAMoLE's RSEA data), if any; `example_rows`: every stream is a run of
    slots of `seq_len + 1` tokens, one right-padded example each
    (`data.instruction_packing=examples`), so windows must start at slot boundaries.
    """

    train: ClientTokens
    val: ClientTokens
    test: ClientTokens
    client_names: tuple[str, ...]
    groups: np.ndarray
    vocab_size: int
    mixtures: np.ndarray | None = None
    shared_eval: Mapping[str, np.ndarray] | None = None
    reference: np.ndarray | None = None
    task: Any = None
    aux: ClientTokens | None = None
    example_rows: bool = False

    @property
    def num_clients(self) -> int:
        return len(self.client_names)

    def split(self, name: str) -> ClientTokens:
        """The `ClientTokens` of split `"train"`, `"val"` or `"test"`."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def validate(
        self,
        seq_len: int,
        vocab_size: int | None = None,
        splits: Sequence[str] = SPLITS,
    ) -> FederatedData:
        """Check the data can feed a model with `vocab_size` (default: `self.vocab_size`) at
        windows of `seq_len + 1` tokens; raise a ValueError naming the client and the fix.
        Returns `self`."""
        vocab = self.vocab_size if vocab_size is None else vocab_size
        n = self.num_clients
        if self.groups.shape != (n,):
            raise ValueError(f"groups has shape {self.groups.shape}, expected ({n},)")
        if self.mixtures is not None:
            if self.mixtures.shape[0] != n:
                raise ValueError(f"mixtures has {self.mixtures.shape[0]} rows for {n} clients")
            check_proportions(self.mixtures)
        for name in splits:
            ct = self.split(name)
            if ct.num_clients != n:
                raise ValueError(f"{name} split has {ct.num_clients} clients, expected {n}")
            check_streams(ct, seq_len, vocab, name, self.client_names)
            for i in range(n):
                length = int(ct.lengths[i])
                if ct.loss_mask is not None and not ct.loss_mask[i, 1:length].any():
                    who = f"client {i} ({self.client_names[i]!r})"
                    raise ValueError(f"{who}: {name} loss mask has no target token")
        for key, stream in (self.shared_eval or {}).items():
            if len(stream) < seq_len + 1:
                raise ValueError(
                    f"shared eval stream {key!r} has {len(stream)} tokens, too short for "
                    f"seq_len + 1 = {seq_len + 1}"
                )
            check_vocab(stream, vocab, f"shared eval stream {key!r}")
        if self.reference is not None:
            if self.reference.ndim != 2:
                raise ValueError(f"reference must be [S, T], got shape {self.reference.shape}")
            check_vocab(self.reference, vocab, "reference set")
        return self


def check_streams(
    ct: ClientTokens,
    seq_len: int,
    vocab_size: int,
    split: str = "train",
    names: Sequence[str] | None = None,
) -> None:
    """Raise, naming the client and the fix, if a stream is empty, shorter than one window of
    `seq_len + 1` tokens, or holds ids outside `[0, vocab_size)`."""
    for i in range(ct.num_clients):
        who = f"client {i} ({names[i]!r})" if names else f"client {i}"
        length = int(ct.lengths[i])
        if length == 0:
            raise ValueError(f"{who} has no {split} data; give it data or drop the client")
        if length < seq_len + 1:
            raise ValueError(
                f"{who}: {split} stream has {length} tokens, too short for one window of "
                f"seq_len + 1 = {seq_len + 1}; give it more data or use a smaller seq_len"
            )
        check_vocab(ct.stream(i), vocab_size, f"{who}'s {split} stream")


def _as_split_source(source: SplitSource, what: str) -> SplitSource:
    if isinstance(source, MaskedStream):
        return source
    if isinstance(source, np.ndarray):
        if source.ndim != 1:
            raise ValueError(f"{what}: token stream must be 1-D, got shape {source.shape}")
        return source
    if isinstance(source, str) or not isinstance(source, Sequence):
        raise TypeError(
            f"{what}: expected a sequence of texts, a 1-D token array or a MaskedStream, "
            f"got {type(source).__name__}"
        )
    return source


def _cut(source: SplitSource, fractions: Sequence[float]) -> list[SplitSource]:
    """Cut a source into consecutive pieces: documents for texts, tokens for streams."""
    total = len(source.tokens) if isinstance(source, MaskedStream) else len(source)
    bounds = np.rint(np.concatenate([[0.0], np.cumsum(fractions)]) * total).astype(int)
    bounds = np.minimum(bounds, total)
    pieces = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if isinstance(source, MaskedStream):
            pieces.append(MaskedStream(source.tokens[lo:hi], source.loss_mask[lo:hi]))
        else:
            pieces.append(source[lo:hi])
    return pieces


def _encode(
    source: SplitSource, tokenizer: Any, vocab_size: int, separator: Separator, what: str
) -> MaskedStream | np.ndarray:
    if isinstance(source, MaskedStream):
        return MaskedStream(np.asarray(source.tokens, np.int32), np.asarray(source.loss_mask))
    if isinstance(source, np.ndarray):
        return source.astype(np.int32)
    if tokenizer is None:
        raise ValueError(f"{what} is given as texts; pass tokenizer= to tokenize them")
    return tokenize_texts(source, tokenizer, vocab_size=vocab_size, separator=separator)


def stack_sources(streams: list[MaskedStream | np.ndarray]) -> ClientTokens:
    """One split's per-client streams (masked or not) as a right-padded `ClientTokens`."""
    if not any(isinstance(s, MaskedStream) for s in streams):
        return stack_streams(streams)
    tokens = [s.tokens if isinstance(s, MaskedStream) else s for s in streams]
    masks = [
        s.loss_mask if isinstance(s, MaskedStream) else np.ones(len(s), np.uint8) for s in streams
    ]
    return stack_streams(tokens, masks)


def build_federated(
    clients: Sequence[ClientSource],
    *,
    vocab_size: int,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    tokenizer: Any = None,
    separator: Separator = "eos",
    client_names: Sequence[str] | None = None,
    groups: Sequence[int] | np.ndarray | None = None,
    mixtures: np.ndarray | None = None,
    shared_eval: Mapping[str, np.ndarray | Sequence[str]] | None = None,
    reference: np.ndarray | None = None,
) -> FederatedData:
    """Assemble `FederatedData` from one source per client.

    A client's source is texts (tokenized with `tokenizer`, documents separated per
    `separator`), a 1-D token stream, or a `MaskedStream`; it is cut into consecutive train / val
    / test pieces by the `split` fractions (whole documents for texts, tokens for streams). A
    client given as a mapping `{"train": ..., "val": ...[, "test": ...]}` uses those explicit
    splits instead (a missing test split is empty). `groups` defaults to the argmax of `mixtures`
    if given, else each client its own group. `shared_eval` values may be streams or texts.
    Call `.validate(seq_len)` on the result before training.
    """
    fractions = [float(f) for f in split]
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"split must be 3 non-negative fractions summing to <= 1, got {split}")
    n = len(clients)
    if n == 0:
        raise ValueError("no clients")
    names = (
        tuple(client_names) if client_names is not None else tuple(f"client{i}" for i in range(n))
    )
    if len(names) != n:
        raise ValueError(f"got {len(names)} client names for {n} clients")
    per_split: dict[str, list[MaskedStream | np.ndarray]] = {s: [] for s in SPLITS}
    for i, source in enumerate(clients):
        what = f"client {i} ({names[i]!r})"
        if isinstance(source, Mapping):
            unknown = set(source) - set(SPLITS)
            if unknown or not {"train", "val"} <= set(source):
                raise ValueError(
                    f"{what}: explicit splits need keys 'train' and 'val' (and optionally "
                    f"'test'), got {sorted(source)}"
                )
            pieces = [source.get(s, np.zeros(0, np.int32)) for s in SPLITS]
        else:
            pieces = _cut(_as_split_source(source, what), fractions)
        for s, piece in zip(SPLITS, pieces, strict=True):
            piece = _as_split_source(piece, f"{what} {s}")
            per_split[s].append(_encode(piece, tokenizer, vocab_size, separator, f"{what} {s}"))
    mix = None if mixtures is None else check_proportions(mixtures)
    if groups is not None:
        group_arr = np.asarray(groups, dtype=np.int64)
    elif mix is not None:
        group_arr = np.argmax(mix, axis=1).astype(np.int64)
    else:
        group_arr = np.arange(n, dtype=np.int64)
    shared = None
    if shared_eval is not None:
        shared = {
            key: (
                np.asarray(value, dtype=np.int32)
                if isinstance(value, np.ndarray)
                else _encode(value, tokenizer, vocab_size, separator, f"shared eval {key!r}")
            )
            for key, value in shared_eval.items()
        }
    return FederatedData(
        train=stack_sources(per_split["train"]),
        val=stack_sources(per_split["val"]),
        test=stack_sources(per_split["test"]),
        client_names=names,
        groups=group_arr,
        vocab_size=int(vocab_size),
        mixtures=mix,
        shared_eval=shared,
        reference=None if reference is None else np.asarray(reference, dtype=np.int32),
    )


def uniform_evaluation(
    data: FederatedData, splits: Sequence[str] = ("val", "test")
) -> FederatedData:
    """Out-of-distribution evaluation (CoMiGS's setting, the router trains on the target
    mixture): every client's `splits` become an equal share of every group's data.

    Per split, the streams of each group's clients are pooled (client order) into `P_g`; with
    `N` clients and `m = min_g |P_g| // N`, client `i` gets `P_0[i·m:(i+1)·m] ‖ P_1[i·m:(i+1)·m]
    ‖ …` (groups in order): a uniform mixture of the `G` groups with `G·m` tokens, no token
    shared by two clients. Loss masks travel with their tokens; training data is unchanged.
    """
    n = data.num_clients
    group_ids = sorted(set(int(g) for g in data.groups))
    pools = [[i for i in range(n) if int(data.groups[i]) == g] for g in group_ids]
    replaced = {}
    for name in splits:
        ct = data.split(name)
        mask = ct.loss_mask
        tokens = [np.concatenate([ct.stream(i) for i in members]) for members in pools]
        masks = (
            None
            if mask is None
            else [np.concatenate([mask[i, : ct.lengths[i]] for i in members]) for members in pools]
        )
        m = min(len(t) for t in tokens) // n
        if m == 0:
            raise ValueError(
                f"uniform {name} evaluation: a group's pooled {name} stream has fewer tokens than "
                f"the {n} clients; give the clients more {name} data ({name}_fraction)"
            )
        replaced[name] = stack_streams(
            _uniform_pieces(tokens, n, m), None if masks is None else _uniform_pieces(masks, n, m)
        )
    return dataclasses.replace(data, **replaced)


def _uniform_pieces(pools: list[np.ndarray], n: int, m: int) -> list[np.ndarray]:
    """Client `i`'s stream: piece `i` (`m` entries) of every pool, pools in order."""
    return [np.concatenate([p[i * m : (i + 1) * m] for p in pools]) for i in range(n)]


def keep_train_fraction(data: FederatedData, fractions: Sequence[float]) -> FederatedData:
    """Users with different amounts of data: client `i` keeps the first
    `round(fractions[i] · |train_i|)` tokens of its training stream (and their loss mask);
    validation, test and everything else unchanged."""
    n = data.num_clients
    values = [float(f) for f in fractions]
    if len(values) != n or not all(0.0 < f <= 1.0 for f in values):
        raise ValueError(
            f"data.train_fractions needs one value in (0, 1] per client ({n} clients), got "
            f"{list(fractions)}"
        )
    ct = data.train
    keep = [int(round(f * int(length))) for f, length in zip(values, ct.lengths, strict=True)]
    streams = [ct.tokens[i, : keep[i]] for i in range(n)]
    masks = None if ct.loss_mask is None else [ct.loss_mask[i, : keep[i]] for i in range(n)]
    return dataclasses.replace(data, train=stack_streams(streams, masks))
