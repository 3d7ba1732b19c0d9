"""Instruction-tuning clients from (prompt, target) examples: FedAMoLE's partitions and per-client
splits (Zhang et al., arXiv:2411.19128, §5.2–5.3; reference `zyc140345/FedAMoLE`,
`data/hete_partition.py`, `data/data_loader.py`, `data/dataset.py::split_dataset`).

- **Partition** over clients: `dirichlet` (SNLI classes, Dolly categories; the reference's
  size-balanced `Dir(α)` rule, `partition.dirichlet`, with `K` the number of distinct labels
  *including* SNLI's unlabelled `-1`, whose rows are never assigned: the reference's draw order)
  or `task` (Natural Instructions "meta1": client `i` holds every example of label `i`, labels in
  string-sorted task-id order, so each client has one task).
- **Per-client split** (`client_splits`): the legacy NumPy stream of the partition continues
  (`np.random.seed(seed)` in the reference): every client's examples are shuffled and cut in
  order into train, aux, val and test at `int(n · cumsum(ratios))`, the reference's `get_ratios`
  with train:aux = `1 - aux_fraction : aux_fraction` of the examples left after val and test
  (`val_fraction`, `test_fraction` of all; reference 10 % / 10 % for generation); aux keeps at
  most `max_aux` (200), val `max_val` (200), test `max_test` (50 generation, 200
  classification) examples; the rest trains. With the reference's `aux_fraction = 0.05` the
  auxiliary set (FedAMoLE's RSEA statistics) is 4 % of a client's examples.
- **Packing** of every split: `examples` (the reference): one example per slot of
  `seq_len + 1` tokens, right-padded with mask 0, cut to `seq_len` tokens with EOS forced,
  examples whose prompt has `>= seq_len` tokens dropped (`tokenize_example_rows`), so a training
  row is one example and nothing crosses an example boundary; `windows`: one token stream
  `[bos] prompt target eos …` per split, cut into fixed windows by the engine. Either way the
  loss mask holds the target and EOS (`tokenize_prompt_target`), so val/test loss and perplexity
  count response tokens only; the aux split's mask (examples) holds every token of its examples
  (the reference's RSEA statistics count prompt and response).
- **Task examples**: the test split's prompts (tokenized alone) with the reference responses, or
  with the gold choice of a classification set whose targets are its label words (SNLI's
  "Yes"/"Maybe"/"No"), for `fedjax_lora.engine.instruction`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from fedjax_lora.data.datasets_hf import LabeledPairs
from fedjax_lora.data.federated import FederatedData, build_federated, stack_sources
from fedjax_lora.data.partition import dirichlet
from fedjax_lora.data.streams import MaskedStream
from fedjax_lora.data.tokenize import (
    encode_batch,
    eos_token_id,
    tokenize_example_rows,
    tokenize_prompt_target,
)

__all__ = [
    "ByteTokenizer",
    "TaskExamples",
    "client_splits",
    "default_bos_id",
    "instruction_data",
    "partition_examples",
    "split_ratios",
    "task_partition",
]

Partition = Literal["dirichlet", "task"]
Packing = Literal["examples", "windows"]
SPLITS = ("train", "aux", "val", "test")


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256) with id 0 (NUL, absent from text) as EOS: the
    tokenizer of the tiny random bases (tests, smoke runs), which have no tokenizer files."""

    eos_token_id = 0
    vocab_size = 256

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False) -> dict[str, Any]:
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        kept = [i for i in ids if not (skip_special_tokens and i == self.eos_token_id)]
        return bytes(kept).decode("utf-8", errors="replace")


class TaskExamples(NamedTuple):
    """Every client's test examples for the task evaluation (host side).

    prompts: per client, the token ids of each prompt (with the BOS if the data has one);
    references: per client, each example's target text; labels: per client, the gold choice of
    each example (classification sets) or None; choices: the token ids of each choice + EOS
    (classification sets, `()` otherwise); eos_id; decode: token ids -> text.
    """

    prompts: tuple[tuple[tuple[int, ...], ...], ...]
    references: tuple[tuple[str, ...], ...]
    labels: tuple[np.ndarray, ...] | None
    choices: tuple[tuple[int, ...], ...]
    eos_id: int
    decode: Callable[[Sequence[int]], str]


def default_bos_id(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer puts before a text by default (Llama's `<|begin_of_text|>`), or
    None (GPT-2, byte tokenizer): FedAMoLE's examples start as the tokenizer encodes them."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer(["a"], add_special_tokens=True)["input_ids"][0]
    return int(bos) if len(ids) and ids[0] == bos else None


def task_partition(labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """FedAMoLE's "meta1": client `i` holds every example of label `i` (`i < num_clients`)."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    if num_clients > present.size:
        raise ValueError(
            f"one task per client needs >= {num_clients} tasks, the data has {present.size}; "
            "use fewer clients or more tasks"
        )
    return [np.flatnonzero(labels == i) for i in range(num_clients)]


def partition_examples(
    labels: np.ndarray,
    num_clients: int,
    partition: Partition,
    alpha: float,
    rng: np.random.RandomState,
) -> list[np.ndarray]:
    """Every client's example indices. `dirichlet`: `partition.dirichlet` over the labels
    (non-negative ones relabelled to ranks `0..`, as the reference's label encoder) with
    `K` = the number of distinct labels including `-1` (the reference's `np.unique(y).shape[0]`),
    so the draws after the last class follow the reference's, and unlabelled rows are never
    assigned; draws from `rng`. `task`: `task_partition`."""
    labels = np.asarray(labels)
    if partition == "task":
        return task_partition(labels, num_clients)
    if partition != "dirichlet":
        raise ValueError(f"partition must be 'dirichlet' or 'task', got {partition!r}")
    present = np.unique(labels[labels >= 0])
    dense = np.where(labels >= 0, np.searchsorted(present, labels), -1)
    return dirichlet(dense, num_clients, alpha, rng, num_classes=np.unique(labels).size)


def split_ratios(val_fraction: float, test_fraction: float, aux_fraction: float) -> list[float]:
    """`[train, aux, val, test]` shares of a client's examples, as the reference's
    `load_dataset.get_ratios(f"{1 - aux},{aux}", val, test)` computes them (same float
    operations, so the same cut points)."""
    if not (val_fraction >= 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"need val_fraction >= 0, test_fraction > 0 and their sum < 1, got {val_fraction}, "
            f"{test_fraction}"
        )
    if not 0 <= aux_fraction < 1:
        raise ValueError(f"data.aux_fraction must be in [0, 1), got {aux_fraction}")
    rs = [1.0 - aux_fraction, aux_fraction]
    rest = 1 - val_fraction - test_fraction
    rs += [sum(rs[:2]) * val_fraction / rest, sum(rs[:2]) * test_fraction / rest]
    total = sum(rs)
    return [r / total for r in rs]


def client_splits(
    parts: Sequence[np.ndarray],
    *,
    val_fraction: float,
    test_fraction: float,
    max_val: int,
    max_test: int,
    seed: int | np.random.RandomState,
    aux_fraction: float = 0.0,
    max_aux: int = 200,
) -> list[dict[str, np.ndarray]]:
    """Per client: `{"train", "aux", "val", "test"}` example indices, as the reference's
    `ClientDataLoader`: the client's indices shuffled by the legacy stream `seed` (a
    `RandomState` continues; an int starts one), cut at `int(n · b)` for the cumulative
    `split_ratios` bounds `b`, then aux, val and test keep their first `max_aux`, `max_val`,
    `max_test` examples (the rest is unused); a split may come out empty for a small client."""
    ratios = split_ratios(val_fraction, test_fraction, aux_fraction)
    bounds = np.cumsum([0.0, *ratios])
    caps = {"train": None, "aux": max_aux, "val": max_val, "test": max_test}
    rng = seed if isinstance(seed, np.random.RandomState) else np.random.RandomState(seed)
    out = []
    for part in parts:
        idx = list(np.asarray(part).tolist())
        rng.shuffle(idx)
        idx = np.asarray(idx, np.int64)
        n = idx.size
        pieces = {}
        for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
            pieces[name] = idx[int(n * lo) : int(n * hi)][: caps[name]]
        out.append(pieces)
    return out


def instruction_data(
    pairs: LabeledPairs,
    tokenizer: Any,
    *,
    vocab_size: int,
    num_clients: int,
    partition: Partition,
    alpha: float = 1.0,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    aux_fraction: float = 0.0,
    max_aux: int = 200,
    max_val: int = 200,
    max_test: int = 50,
    choices: bool = False,
    bos_id: int | None = None,
    packing: Packing = "windows",
    seq_len: int | None = None,
) -> FederatedData:
    """The clients' train/val/test (and, with `aux_fraction > 0`, aux) data, with their test
    examples for the task evaluation as `task` (`TaskExamples`).

    partition: `dirichlet` (`alpha`, the data's labels as classes; rows labelled -1 count in the
    draw, then drop out) or `task` (one label per client); one legacy NumPy stream seeded with
    `seed` draws the partition and the splits (`partition_examples`, `client_splits`).
    choices: the task is multiple choice over `pairs.label_names` (every labelled target must be
    its label's name, as SNLI's); the task examples then carry the gold labels. packing:
    `examples` (one right-padded example per slot of `seq_len + 1` tokens; over-long prompts
    dropped from every split, test included) or `windows` (one stream per split).
    """
    if packing not in ("examples", "windows"):
        raise ValueError(
            f"data.instruction_packing must be 'examples' or 'windows', got {packing!r}"
        )
    if packing == "examples" and seq_len is None:
        raise ValueError("instruction_packing='examples' needs seq_len (tokens per example)")
    labels = np.asarray(pairs.labels)
    if choices:
        wrong = [
            i
            for i, (t, k) in enumerate(zip(pairs.targets, labels, strict=True))
            if k >= 0 and t != pairs.label_names[k]
        ]
        if wrong:
            raise ValueError(
                f"choice accuracy needs targets equal to their label names ({pairs.label_names}); "
                f"example {wrong[0]} has target {pairs.targets[wrong[0]]!r}: use a classification "
                "set such as snli, or metric rouge_l"
            )
    rng = np.random.RandomState(seed)
    parts = partition_examples(labels, num_clients, partition, alpha, rng)
    splits = client_splits(
        parts,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        aux_fraction=aux_fraction,
        max_aux=max_aux,
        max_val=max_val,
        max_test=max_test,
        seed=rng,
    )
    eos = eos_token_id(tokenizer)

    def tokenize(idx: np.ndarray, targets_only: bool = True) -> tuple[MaskedStream, np.ndarray]:
        prompts, targets = [pairs.prompts[j] for j in idx], [pairs.targets[j] for j in idx]
        kw = {"vocab_size": vocab_size, "eos_id": eos, "bos_id": bos_id}
        if packing == "windows":
            return tokenize_prompt_target(prompts, targets, tokenizer, **kw), idx
        stream, kept = tokenize_example_rows(
            prompts, targets, tokenizer, max_length=seq_len, targets_only=targets_only, **kw
        )
        return stream, idx[kept]

    clients, aux, kept_tests = [], [], []
    names = ("train", "val", "test", "aux") if aux_fraction > 0 else ("train", "val", "test")
    for i, s in enumerate(splits):
        streams, kept = {}, {}
        for name in names:
            if not s[name].size:
                raise ValueError(
                    f"client {i} has too few examples for a {name} split; use fewer clients, "
                    "more data or a larger split fraction"
                )
            streams[name], kept[name] = tokenize(s[name], targets_only=name != "aux")
            if not kept[name].size:
                raise ValueError(
                    f"client {i}: every {name} example has a prompt of >= seq_len={seq_len} "
                    "tokens; raise training.seq_len or use data.instruction_packing=windows"
                )
        kept_tests.append(kept["test"])
        if aux_fraction > 0:
            aux.append(streams.pop("aux"))
        clients.append(streams)
    data = build_federated(
        clients,
        vocab_size=vocab_size,
        client_names=[f"client{i}" for i in range(num_clients)],
        groups=[int(np.bincount(labels[s["train"]]).argmax()) for s in splits],
    )
    head = () if bos_id is None else (bos_id,)
    prompts = tuple(
        tuple(head + tuple(ids) for ids in encode_batch(tokenizer, [pairs.prompts[j] for j in t]))
        for t in kept_tests
    )
    choice_ids = ()
    if choices:
        choice_ids = tuple(
            tuple(ids) + (eos,) for ids in encode_batch(tokenizer, pairs.label_names)
        )
    task = TaskExamples(
        prompts=prompts,
        references=tuple(tuple(pairs.targets[j] for j in t) for t in kept_tests),
        labels=tuple(labels[t] for t in kept_tests) if choices else None,
        choices=choice_ids,
        eos_id=eos,
        decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
    )
    return dataclasses.replace(
        data,
        task=task,
        aux=stack_sources(aux) if aux else None,
        example_rows=packing == "examples",
    )
