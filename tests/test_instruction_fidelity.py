"""FedAMoLE's data protocol against NumPy transcriptions of the reference (`zyc140345/FedAMoLE`):
the Dirichlet partition with SNLI's unlabelled rows, the per-client train/aux/eval/test cuts,
the example-per-row preprocessing, and response-only evaluation weights."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lora.algorithms.fedamole import input_weights
from fedjax_lora.data.datasets_hf import LabeledPairs
from fedjax_lora.data.instruction import (
    ByteTokenizer,
    client_splits,
    instruction_data,
    partition_examples,
)
from fedjax_lora.data.tokenize import tokenize_example_rows
from fedjax_lora.engine.batches import sample_starts, windows_at

IGNORE = -100


def reference_partition_idx_dir(y, num_parts, alpha, num_classes):
    """`data/hete_partition.py::partition_idx_dir`, verbatim but for names (global NumPy RNG)."""
    min_size, n = 0, y.shape[0]
    idx_parts = []
    while min_size < 10:
        idx_parts = [[] for _ in range(num_parts)]
        for k in range(num_classes):
            idx_k = np.where(y == k)[0]
            np.random.shuffle(idx_k)
            proportions = np.random.dirichlet(np.repeat(alpha, num_parts))
            proportions = np.array(
                [
                    p * (len(part) < n / num_parts)
                    for p, part in zip(proportions, idx_parts, strict=True)
                ]
            )
            proportions = proportions / proportions.sum()
            proportions = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
            for part, chunk in zip(idx_parts, np.split(idx_k, proportions), strict=True):
                part.extend(chunk.tolist())
        min_size = min(len(part) for part in idx_parts)
    for part in idx_parts:
        np.random.shuffle(part)
    return idx_parts


def reference_client_sets(y, num_clients, alpha, seed, ratio_eval, ratio_test, test_cap):
    """`main.py` (`set_seed`) + `load_dataset.get_ratios("0.95,0.05", ...)` +
    `ClientDataLoader.__init__` (num_classes = unique labels, per-client shuffle,
    `split_dataset`, caps 200/200/test_cap)."""
    np.random.seed(seed)
    rs = [0.95, 0.05]
    rs.append(sum(rs[:2]) * ratio_eval / (1 - ratio_eval - ratio_test))
    rs.append(sum(rs[:2]) * ratio_test / (1 - ratio_eval - ratio_test))
    ratios = [r / sum(rs) for r in rs]
    parts = reference_partition_idx_dir(y, num_clients, alpha, np.unique(y).shape[0])
    out = []
    for part in parts:
        np.random.shuffle(part)
        bounds = np.cumsum([0.0] + ratios)
        sets = [
            part[int(len(part) * lo) : int(len(part) * hi)]
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        train, aux, ev, te = sets
        out.append({"train": train, "aux": aux[:200], "val": ev[:200], "test": te[:test_cap]})
    return out


@pytest.mark.parametrize("seed", [42, 62, 82])
@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_snli_partition_and_splits_follow_reference(seed, alpha):
    """SNLI-shaped labels with -1 rows: K counts -1, its rows drop out; the same stream then
    shuffles and cuts every client's examples (SNLI's official eval/test shares)."""
    rng = np.random.default_rng(seed)
    y = rng.choice([-1, 0, 1, 2], size=30000, p=[0.02, 0.33, 0.33, 0.32])
    share = 10000 / (550152 + 10000 + 10000)
    want = reference_client_sets(y, 10, alpha, seed, share, share, 200)
    state = np.random.RandomState(seed)
    parts = partition_examples(y, 10, "dirichlet", alpha, state)
    got = client_splits(
        parts,
        val_fraction=share,
        test_fraction=share,
        aux_fraction=0.05,
        max_aux=200,
        max_val=200,
        max_test=200,
        seed=state,
    )
    for g, w in zip(got, want, strict=True):
        for name in ("train", "aux", "val", "test"):
            np.testing.assert_array_equal(g[name], w[name])
        assert not np.any(y[g["train"]] < 0)


def test_dolly_splits_aux_is_four_percent_capped():
    """Dolly-shaped (8 categories, eval = test = 0.1): train/aux/eval/test = 76/4/10/10 % of each
    client's examples, cut as the reference; aux at most 200."""
    y = np.random.default_rng(0).integers(0, 8, 15011)
    want = reference_client_sets(y, 10, 1.0, 42, 0.1, 0.1, 50)
    state = np.random.RandomState(42)
    parts = partition_examples(y, 10, "dirichlet", 1.0, state)
    got = client_splits(
        parts,
        val_fraction=0.1,
        test_fraction=0.1,
        aux_fraction=0.05,
        max_val=200,
        max_test=50,
        seed=state,
    )
    for g, w, part in zip(got, want, parts, strict=True):
        for name in ("train", "aux", "val", "test"):
            np.testing.assert_array_equal(g[name], w[name])
        n = len(part)
        assert abs(len(g["aux"]) - 0.04 * n) <= 1 and abs(len(g["test"]) - min(50, 0.1 * n)) <= 1
    big = client_splits(
        [np.arange(6000)],
        val_fraction=0.1,
        test_fraction=0.1,
        aux_fraction=0.05,
        max_val=200,
        max_test=50,
        seed=0,
    )[0]
    assert len(big["aux"]) == 200 and len(big["val"]) == 200  # 4 % = 240, 10 % = 600: capped


def reference_causal_lm_rows(prompts, targets, max_length, eos):
    """`CausalLMPreprocessor(train=True)` on byte ids + `ClientDataLoader`'s filter."""
    rows = []
    for p, t in zip(prompts, targets, strict=True):
        src, tgt = list(p.encode()), list(t.encode()) + [eos]
        ids, labels = src + tgt, [IGNORE] * len(src) + tgt
        ids, labels = ids[:max_length], labels[:max_length]
        ids, labels = ids[:-1] + [eos], labels[:-1] + [eos]
        if len(src) < max_length:
            rows.append((ids, labels))
    return rows


def test_example_rows_truncate_force_eos_and_drop_long_prompts():
    prompts = ["short?", "a much longer prompt than fits", "mid prompt:", "q"]
    targets = ["yes", "no", "a long answer that is cut", ""]
    max_length = 16
    stream, kept = tokenize_example_rows(
        prompts, targets, ByteTokenizer(), vocab_size=256, max_length=max_length, eos_id=0
    )
    want = reference_causal_lm_rows(prompts, targets, max_length, 0)
    assert kept.tolist() == [0, 2, 3]
    tokens = stream.tokens.reshape(-1, max_length + 1)
    mask = stream.loss_mask.reshape(-1, max_length + 1)
    assert tokens.shape[0] == len(want)
    for row, m, (ids, labels) in zip(tokens, mask, want, strict=True):
        assert row[: len(ids)].tolist() == ids
        assert m[: len(ids)].tolist() == [int(v != IGNORE) for v in labels]
        assert not m[len(ids) :].any()
    everything, _ = tokenize_example_rows(
        prompts, targets, ByteTokenizer(), vocab_size=256, max_length=16, targets_only=False
    )
    lengths = [len(ids) for ids, _ in want]
    np.testing.assert_array_equal(everything.loss_mask.reshape(-1, 17).sum(1), lengths)


@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_example_sampler_draws_whole_slots(sampling):
    """One example per row: every window is a slot, its weights the example's target mask; an
    epoch visits every slot once."""
    prompts = [f"prompt {i}:" for i in range(7)]
    targets = [" ans" * (i % 3 + 1) for i in range(7)]
    stream, _ = tokenize_example_rows(
        prompts, targets, ByteTokenizer(), vocab_size=256, max_length=15
    )
    tokens, mask = jnp.asarray(stream.tokens), jnp.asarray(stream.loss_mask)
    length = jnp.asarray(stream.tokens.size)
    starts = sample_starts(
        jax.random.key(3),
        length,
        jnp.asarray(0),
        batch_size=7,
        seq_len=15,
        max_windows=stream.tokens.size // 15,
        sampling=sampling,
        examples=True,
    )
    starts = np.asarray(starts)
    assert np.all(starts % 16 == 0) and np.all(starts < stream.tokens.size)
    if sampling == "epoch":
        assert sorted(starts.tolist()) == [16 * i for i in range(7)]
    batch = windows_at(tokens, jnp.asarray(starts), 15, mask)
    rows = stream.tokens.reshape(7, 16)
    masks = stream.loss_mask.reshape(7, 16)
    for b, s in enumerate(starts // 16):
        np.testing.assert_array_equal(batch.inputs[b], rows[s, :15])
        np.testing.assert_array_equal(batch.weights[b], masks[s, 1:])


def pairs_with_unlabelled(n=240):
    rng = np.random.default_rng(1)
    labels = rng.choice([-1, 0, 1, 2], size=n, p=[0.05, 0.35, 0.3, 0.3])
    names = ("Yes", "Maybe", "No")
    prompts = [f"Q{i} is it?" for i in range(n)]
    targets = [names[k] if k >= 0 else "" for k in labels]
    return LabeledPairs(prompts, targets, labels, names)


@pytest.mark.parametrize("packing", ["examples", "windows"])
def test_instruction_data_uses_reference_membership(packing):
    """End to end: the test examples and aux sizes are the reference's for the same seed; no
    unlabelled row reaches a client."""
    pairs = pairs_with_unlabelled()
    want = reference_client_sets(pairs.labels, 3, 1.0, 7, 0.1, 0.1, 200)
    data = instruction_data(
        pairs,
        ByteTokenizer(),
        vocab_size=256,
        num_clients=3,
        partition="dirichlet",
        seed=7,
        aux_fraction=0.05,
        max_test=200,
        choices=True,
        packing=packing,
        seq_len=32,
    )
    for i, w in enumerate(want):
        got = [pairs.prompts.index(ByteTokenizer().decode(p)) for p in data.task.prompts[i]]
        assert got == list(w["test"])
        if packing == "examples":
            assert data.aux.lengths[i] == 33 * len(w["aux"])
            assert data.train.lengths[i] == 33 * len(w["train"])
    assert data.example_rows == (packing == "examples")


def test_example_eval_weights_count_responses_and_aux_all_tokens(tmp_path):
    """`build_problem` with example rows: val/test weights are exactly each example's response
    bytes + EOS (found from the text: what follows the prompt's "?"), aux weights every real
    token; FedAMoLE's RSEA inputs are then the example's tokens."""
    from fedjax_lora.config import ExperimentConfig, from_dict
    from fedjax_lora.experiment import build_problem

    path = tmp_path / "snli.jsonl"
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sun", "tree"]

    with path.open("w") as f:
        for i in range(200):
            w = rng.choice(words, 2)
            row = {"premise": f"A {w[0]}.", "hypothesis": f"A {w[1]}.", "label": int(i % 4) - 1}
            f.write(json.dumps(row) + "\n")
    config = from_dict(
        ExperimentConfig,
        {
            "methods": ["fedamole"],
            "model": {"vocab_size": 256, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32},
            "training": {"steps": 1, "batch_size": 2, "seq_len": 96},
            "eval": {"max_windows": 64, "batch_size": 4},
            "data": {
                "source": "snli",
                "paths": [str(path)],
                "num_clients": 2,
                "aux_fraction": 0.1,
                "alpha": 100.0,
            },
        },
    )
    problem, data = build_problem(config)
    assert problem.training.packing == "examples"
    for name in ("val", "test", "aux"):
        s = problem.windows(name)
        windows, weights = np.asarray(s.windows), np.asarray(s.weights)
        for row, wt in zip(windows.reshape(-1, 97), weights.reshape(-1, 96), strict=True):
            if not row.any():
                assert not wt.any()
                continue
            end = int(np.flatnonzero(row == 0)[0])  # the example's EOS
            text = bytes(row[:end].tolist()).decode()
            first = text.index("Maybe?\n") + len("Maybe?\n") if name != "aux" else 1
            want = np.zeros(96)
            want[first - 1 : end] = 1  # targets first..end (EOS) are tokens first..end
            np.testing.assert_array_equal(wt, want)
            if name == "aux":
                x = np.asarray(input_weights(jnp.asarray(wt)[None]))[0]
                np.testing.assert_array_equal(x, np.arange(96) <= end)
