"""Instruction-tuning clients from (prompt, target) examples: FedAMoLE's partitions and per-client
splits (Zhang et al., arXiv:2411.19128, §5.2–5.3; reference `zyc140345/FedAMoLE`,
`data/hete_partition.py`, `data/data_loader.py`, `data/dataset.py::split_dataset`).

- **Partition** over clients: `dirichlet` (SNLI classes, Dolly categories; the reference's
  size-balanced `Dir(α)` rule, `partition.dirichlet`) or `task` (Natural Instructions "meta1":
  client `i` holds every example of label `i`, labels in string-sorted task-id order, so each
  client has one task).
- **Per-client split**: the client's examples are shuffled and cut in order into train, val and
  test (`val_fraction`, `test_fraction` of its examples, rounded; the reference's 10 % / 10 % for
  generation); val keeps at most `max_val` examples and test at most `max_test` (reference: 200,
  and 50 for generation / 200 for classification); the rest trains.
- **Streams**: each split is one token stream `[bos] prompt target eos …` with the loss mask on
  the target and EOS (`tokenize_prompt_target`), so the window evaluation of val/test measures the
  responses' perplexity; FedAMoLE's auxiliary split is cut off the training stream by
  `data.aux_fraction` (`experiment.build_problem`).
- **Task examples**: the test split's prompts (tokenized alone) with the reference responses, or
  with the gold choice of a classification set whose targets are its label words (SNLI's
  "Yes"/"Maybe"/"No"), for `fedjax_lora.engine.instruction`.

Deviation from the reference: training draws fixed-length windows from the client's stream of
concatenated examples (the engine's sampler) instead of one left-padded example per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from fedjax_lora.data.datasets_hf import LabeledPairs
from fedjax_lora.data.federated import FederatedData, build_federated
from fedjax_lora.data.partition import dirichlet
from fedjax_lora.data.tokenize import encode_batch, eos_token_id, tokenize_prompt_target

__all__ = [
    "ByteTokenizer",
    "TaskExamples",
    "client_splits",
    "default_bos_id",
    "instruction_data",
    "task_partition",
]

Partition = Literal["dirichlet", "task"]


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


def client_splits(
    parts: Sequence[np.ndarray],
    *,
    val_fraction: float,
    test_fraction: float,
    max_val: int,
    max_test: int,
    seed: int,
) -> list[dict[str, np.ndarray]]:
    """Per client: `{"train", "val", "test"}` example indices after a seeded shuffle.

    With `n` examples, `n_val = round(val_fraction · n)` and `n_test = round(test_fraction · n)`
    (each at least 1), cut in order train / val / test; val and test then keep their first
    `max_val` / `max_test` examples (the reference's caps; the rest is unused)."""
    if val_fraction < 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"need val_fraction >= 0, test_fraction > 0 and their sum < 1, got {val_fraction}, "
            f"{test_fraction}"
        )
    rng = np.random.default_rng(seed)
    out = []
    for i, part in enumerate(parts):
        idx = rng.permutation(np.asarray(part))
        n = idx.size
        n_val = max(int(round(val_fraction * n)), 1 if val_fraction > 0 else 0)
        n_test = max(int(round(test_fraction * n)), 1)
        n_train = n - n_val - n_test
        if n_train < 1:
            raise ValueError(
                f"client {i} has {n} examples, too few for train/val/test splits; use fewer "
                "clients or more data"
            )
        val = idx[n_train : n_train + n_val][:max_val]
        out.append({"train": idx[:n_train], "val": val, "test": idx[n_train + n_val :][:max_test]})
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
    max_val: int = 200,
    max_test: int = 50,
    choices: bool = False,
    bos_id: int | None = None,
) -> FederatedData:
    """The clients' train/val/test streams, with their test examples for the task evaluation as
    `task` (`TaskExamples`).

    partition: `dirichlet` (`alpha`, the data's labels as classes) or `task` (one label per
    client). choices: the task is multiple choice over `pairs.label_names` (every target must be
    its label's name, as SNLI's); the task examples then carry the gold labels.
    """
    if partition == "dirichlet":
        parts = dirichlet(
            pairs.labels, num_clients, alpha, seed, num_classes=len(pairs.label_names)
        )
    elif partition == "task":
        parts = task_partition(pairs.labels, num_clients)
    else:
        raise ValueError(f"partition must be 'dirichlet' or 'task', got {partition!r}")
    if choices:
        wrong = [
            i
            for i, (t, k) in enumerate(zip(pairs.targets, pairs.labels, strict=True))
            if t != pairs.label_names[k]
        ]
        if wrong:
            raise ValueError(
                f"choice accuracy needs targets equal to their label names ({pairs.label_names}); "
                f"example {wrong[0]} has target {pairs.targets[wrong[0]]!r}: use a classification "
                "set such as snli, or metric rouge_l"
            )
    splits = client_splits(
        parts,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_val=max_val,
        max_test=max_test,
        seed=seed,
    )
    eos = eos_token_id(tokenizer)

    def stream(idx: np.ndarray):
        return tokenize_prompt_target(
            [pairs.prompts[j] for j in idx],
            [pairs.targets[j] for j in idx],
            tokenizer,
            vocab_size=vocab_size,
            eos_id=eos,
            bos_id=bos_id,
        )

    clients = [{name: stream(s[name]) for name in ("train", "val", "test")} for s in splits]
    data = build_federated(
        clients,
        vocab_size=vocab_size,
        client_names=[f"client{i}" for i in range(num_clients)],
        groups=[int(np.bincount(pairs.labels[s["train"]]).argmax()) for s in splits],
    )
    head = () if bos_id is None else (bos_id,)
    prompts = tuple(
        tuple(
            head + tuple(ids)
            for ids in encode_batch(tokenizer, [pairs.prompts[j] for j in s["test"]])
        )
        for s in splits
    )
    choice_ids = ()
    if choices:
        choice_ids = tuple(
            tuple(ids) + (eos,) for ids in encode_batch(tokenizer, pairs.label_names)
        )
    task = TaskExamples(
        prompts=prompts,
        references=tuple(tuple(pairs.targets[j] for j in s["test"]) for s in splits),
        labels=tuple(pairs.labels[s["test"]] for s in splits) if choices else None,
        choices=choice_ids,
        eos_id=eos,
        decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
    )
    return dataclasses.replace(data, task=task)
