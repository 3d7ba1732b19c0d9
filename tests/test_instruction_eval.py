"""Instruction-tuning evaluation: ROUGE-L against an LCS reference, the relative-improvement
formula, per-client generation and choice accuracy (every client with its own adapters, clients
mapped by the strategy) against NumPy loops, the instruction data builder, and the FedAMoLE
runner's smoke setting end to end."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lora.algorithms.base import evaluation
from fedjax_lora.data.datasets_hf import LabeledPairs
from fedjax_lora.data.instruction import ByteTokenizer, instruction_data
from fedjax_lora.engine import Strategy
from fedjax_lora.engine.instruction import (
    TextTask,
    make_choice_set,
    make_generation_set,
    relative_improvement,
    rouge_l,
    score_generations,
)
from tests.test_generate_cache import numpy_greedy
from tests.tiny import tiny_problem

ROOT = Path(__file__).resolve().parents[1]


def lcs_rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F1 by dynamic programming over lowercase alphanumeric tokens."""
    h, r = (re.findall(r"[a-z0-9]+", s.lower()) for s in (hyp, ref))
    if not h or not r:
        return 0.0
    table = np.zeros((len(h) + 1, len(r) + 1), int)
    for i, a in enumerate(h):
        for j, b in enumerate(r):
            table[i + 1, j + 1] = (
                table[i, j] + 1 if a == b else max(table[i, j + 1], table[i + 1, j])
            )
    lcs = table[-1, -1]
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 2 * p * rec / (p + rec)


@pytest.mark.parametrize(
    "hyp, ref",
    [
        ("The cat sat on the mat.", "the cat is on the mat"),
        ("police killed the gunman", "the gunman killed police"),
        ("Red, yellow and blue.", "Red, yellow and blue."),
        ("nothing in common", "entirely different words"),
        ("", "a reference"),
        ("   ", "a reference"),
    ],
)
def test_rouge_score_option_matches_lcs_reference(hyp, ref):
    assert rouge_l(hyp, ref, "rouge-score") == pytest.approx(lcs_rouge_l(hyp, ref), abs=1e-12)


ROUGE_PAIRS = [
    ("The cat sat on the mat.", "the cat is on the mat"),
    ("Paris. It is the capital of France.", "The capital of France is Paris."),
    ("the the the cat", "the cat the dog"),
    ("Yes, 42 items (approx.)", "yes 42 items approx"),
    ("nothing in common", "entirely different words"),
    ("   ", "a reference"),
]


@pytest.mark.parametrize("hyp, ref", ROUGE_PAIRS)
def test_rouge_l_default_is_the_rouge_package(hyp, ref):
    """The default equals the paper's metric, `rouge.Rouge().get_scores` (PyPI `rouge` 1.0.1),
    called as the reference's `evaluation.rouge_score` does."""
    from rouge import Rouge as RougePackage

    want = RougePackage().get_scores([hyp], [ref])[0]["rouge-l"]["f"]
    assert rouge_l(hyp, ref) == pytest.approx(want, abs=1e-12)


def test_rouge_l_reference_zero_cases():
    """The reference scores an empty hypothesis, and one the package refuses, as 0."""
    from rouge import Rouge as RougePackage

    with pytest.raises(ValueError):
        RougePackage().get_scores(["..."], ["a b"])
    assert rouge_l("", "a b") == 0.0
    assert rouge_l("...", "a b") == 0.0


def test_rouge_and_rouge_score_differ():
    """Case and punctuation kept, whitespace tokens: the two metrics disagree on the same pair
    (the paper's 0.5 vs rouge-score's 1.0 here: "Yes," and "CAT" match nothing in `rouge`)."""
    hyp, ref = "Yes, the CAT sat.", "yes the cat sat"
    paper, google = rouge_l(hyp, ref), rouge_l(hyp, ref, "rouge-score")
    assert google == pytest.approx(lcs_rouge_l(hyp, ref), abs=1e-12) == 1.0
    assert paper == pytest.approx(0.5, abs=1e-7)  # LCS "the sat": P = R = 2/4
    with pytest.raises(ValueError, match="rouge"):
        rouge_l(hyp, ref, "bleu")


def test_relative_improvement_formula():
    ours = {"snli": 88.0, "ni": 60.0}
    baselines = {"fedit-ft": {"snli": 86.0, "ni": 52.0}, "fdlora": {"snli": 80.0, "ni": 56.0}}
    got = relative_improvement(ours, baselines)
    # Per scenario: against that scenario's best baseline (fedit-ft on SNLI, fdlora on NI).
    assert got["per_scenario"]["snli"] == pytest.approx(100 * (88 - 86) / 86)
    assert got["per_scenario"]["ni"] == pytest.approx(100 * (60 - 56) / 56)
    # Overall: against the one baseline with the best mean (fedit-ft 69 > fdlora 68).
    assert got["best_baseline"] == "fedit-ft"
    assert got["total"] == pytest.approx(100 * (74 - 69) / 69)
    with pytest.raises(ValueError, match="no score"):
        relative_improvement(ours, {"x": {"snli": 1.0}})
    assert np.isnan(relative_improvement({"a": 1.0}, {"b": {"a": 0.0}})["total"])


def client_params(problem, seed=0):
    """Three clients' adapters, every factor random (B too), so the clients differ."""
    rng = np.random.default_rng(seed)
    n = problem.num_clients
    return jax.tree.map(
        lambda x: jnp.asarray(0.5 * rng.normal(size=(n, *x.shape)), x.dtype), problem.template
    )


def client_model(problem, params, i):
    return nnx.merge(problem.graphdef, jax.tree.map(lambda x: x[i], params), problem.base)


PROMPTS = [
    [[5, 9, 2, 7], [3, 3], [8, 1, 4, 6, 2, 9]],
    [[11, 2]],
    [[7, 7, 7], [1, 2, 3, 4, 5]],
]


@pytest.mark.parametrize("kind", ["map", "vmap"])
def test_per_client_generation_and_choice_accuracy(kind):
    problem = tiny_problem(3, strategy=Strategy(kind))
    params = client_params(problem)
    eos, steps = 3, 5
    refs = tuple(tuple(f"r{j}" for j in range(len(p))) for p in PROMPTS)
    task = TextTask("rouge_l", steps, eos, refs, lambda ids: " ".join(map(str, ids)))
    gen_problem = problem.with_task(task, make_generation_set(PROMPTS, 4, 6))
    chex.assert_shape(gen_problem.eval_sets["task"].prompts, (3, 4, 6))
    run = jax.jit(lambda p, sets, base, pr=gen_problem: evaluation(pr, p, sets, base))
    out = run(params, gen_problem.eval_sets, gen_problem.base)
    generated = np.asarray(out["task"]["generated"])
    chex.assert_shape(generated, (3, 4, steps))
    for i, prompts in enumerate(PROMPTS):
        want = numpy_greedy(client_model(problem, params, i), prompts, steps, eos=eos)
        assert generated[i, : len(prompts)].tolist() == want
        assert np.all(generated[i, len(prompts) :] == eos)  # padding examples
    assert set(out) == {"val", "task"}  # the window sets are still evaluated

    choices = [[4, 3], [9, 3], [2, 2, 3]]  # each choice's tokens + EOS
    labels = [[0, 1, 2], [1], [2, 0]]
    choice_problem = problem.with_task(
        TextTask("choice_accuracy"), make_choice_set(PROMPTS, labels, choices, 2, 6)
    )
    run = jax.jit(lambda p, sets, base, pr=choice_problem: evaluation(pr, p, sets, base))
    acc = np.asarray(run(params, choice_problem.eval_sets, choice_problem.base)["task"]["accuracy"])
    # One compiled forward on a fixed zero buffer: causal logits of a sequence at its start are
    # those of the sequence alone.
    forward = jax.jit(lambda pr, i, x: client_model(problem, pr, i)(x))
    for i, prompts in enumerate(PROMPTS):
        hits = 0
        for prompt, label in zip(prompts, labels[i], strict=True):
            losses = []
            for c in choices:
                seq = prompt[-6:] + c
                buffer = np.zeros((1, 16), np.int32)
                buffer[0, : len(seq)] = seq
                logits = np.asarray(forward(params, i, buffer), np.float64)[0, : len(seq)]
                top = logits.max(-1, keepdims=True)
                logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
                start = len(seq) - len(c)
                losses.append(-np.mean([logp[t - 1, seq[t]] for t in range(start, len(seq))]))
            hits += int(np.argmin(losses) == label)
        assert acc[i] == pytest.approx(hits / len(prompts), abs=1e-6)


def test_score_generations_cuts_at_eos_and_decodes():
    tok = ByteTokenizer()
    refs = (("a red cat", "blue sky"), ("green tree",))
    task = TextTask("rouge_l", 12, 0, refs, tok.decode, rouge="rouge-score")
    rows = np.zeros((2, 2, 12), np.int32)
    rows[0, 0, :9] = list(b"a red cat")
    rows[0, 1, :8] = list(b"blue sun")
    rows[0, 1, 9:12] = list(b"sky")  # after the EOS at 8: ignored
    rows[1, 0, :5] = list(b"green")
    got = score_generations(rows, task)
    want = [
        (lcs_rouge_l("a red cat", "a red cat") + lcs_rouge_l("blue sun", "blue sky")) / 2,
        lcs_rouge_l("green", "green tree"),
    ]
    np.testing.assert_allclose(got, want)


def test_task_check_and_errors():
    sets = make_generation_set(PROMPTS, 4, 6)
    with pytest.raises(ValueError, match="references per client"):
        TextTask("rouge_l", 4, 0, (("x",),), str).check(sets)
    with pytest.raises(ValueError, match="needs a ChoiceSet"):
        TextTask("choice_accuracy").check(sets)
    with pytest.raises(ValueError, match="decode"):
        TextTask("rouge_l")
    with pytest.raises(ValueError, match="label"):
        make_choice_set(PROMPTS, [[0, 1, 5], [0], [0, 0]], [[1], [2]], 2, 6)
    problem = tiny_problem(3)
    refs = tuple(tuple("r" for _ in p) for p in PROMPTS)
    with pytest.raises(ValueError, match="eval_batch_size"):
        problem.with_task(TextTask("rouge_l", 4, 0, refs, str), make_generation_set(PROMPTS, 3, 6))


def synthetic_pairs(n=120, classes=("Yes", "Maybe", "No"), labelled_targets=True):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(classes), n)
    prompts = [f"Prompt {i}?" for i in range(n)]
    targets = [classes[k] if labelled_targets else f"answer {i}" for i, k in enumerate(labels)]
    return LabeledPairs(prompts, targets, labels, tuple(classes))


def test_instruction_data_partitions_splits_and_task_examples():
    tok = ByteTokenizer()
    pairs = synthetic_pairs()
    data = instruction_data(
        pairs,
        tok,
        vocab_size=256,
        num_clients=4,
        partition="dirichlet",
        seed=1,
        max_test=5,
        choices=True,
    )
    task = data.task
    seen = set()
    for i in range(4):
        n_test = len(task.prompts[i])
        assert 1 <= n_test <= 5 and len(task.references[i]) == n_test
        prompts = [tok.decode(p) for p in task.prompts[i]]
        for p, ref, lab in zip(prompts, task.references[i], task.labels[i], strict=True):
            j = pairs.prompts.index(p)
            assert ref == pairs.targets[j] and lab == pairs.labels[j]
            assert j not in seen
            seen.add(j)
        # The test stream is the test examples' prompt + target + EOS, masked on target + EOS.
        stream = data.test.stream(i)
        mask = data.test.loss_mask[i, : len(stream)]
        want = b"".join(
            p.encode() + r.encode() + b"\0"
            for p, r in zip(prompts, task.references[i], strict=True)
        )
        assert stream.tobytes() == np.frombuffer(want, np.uint8).astype(np.int32).tobytes()
        assert tok.decode(stream[mask == 1]) == "".join(task.references[i])
    assert task.choices == tuple(tuple(c.encode()) + (0,) for c in pairs.label_names)
    # Train + val + test of all clients never share an example and cover the partition.
    total = sum(int(np.sum(data.split(s).lengths)) for s in ("train", "val", "test"))
    assert total <= sum(
        len(p) + len(t) + 1 for p, t in zip(pairs.prompts, pairs.targets, strict=True)
    )

    meta = instruction_data(
        pairs, tok, vocab_size=256, num_clients=3, partition="task", choices=False
    )
    for i in range(3):
        for p in meta.task.prompts[i]:
            assert pairs.labels[pairs.prompts.index(tok.decode(p))] == i
    with pytest.raises(ValueError, match="label names"):
        instruction_data(
            synthetic_pairs(labelled_targets=False),
            tok,
            vocab_size=256,
            num_clients=3,
            partition="dirichlet",
            choices=True,
        )
    with pytest.raises(ValueError, match="tasks"):
        instruction_data(pairs, tok, vocab_size=256, num_clients=4, partition="task")


def test_fedamole_runner_smoke(tmp_path):
    """`experiments/fedamole/run.py --smoke`: config -> data -> FedAMoLE and FedIT-FT runs ->
    per-client ROUGE-L in metrics.jsonl -> the results table."""
    sys.path.insert(0, str(ROOT / "experiments" / "fedamole"))
    try:
        import run as runner
    finally:
        sys.path.pop(0)
    out = tmp_path / "smoke"
    assert runner.main(["--smoke", "--cells", "dolly", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["scores"]["dolly"]) == {"fedamole", "fedit-ft"}
    for group, method in (("aux", "fedamole"), ("plain", "fedit-ft")):
        records = [
            json.loads(line)
            for line in (out / "dolly" / "seed0" / group / "metrics.jsonl").read_text().splitlines()
        ]
        last = [r for r in records if r["method"] == method][-1]
        assert len(last["task_rouge_l"]) == 3
        assert all(0.0 <= v <= 1.0 for v in last["task_rouge_l"])
        assert last["task_mean_rouge_l"] == pytest.approx(np.mean(last["task_rouge_l"]))
        assert 100 * last["task_mean_rouge_l"] == pytest.approx(
            results["scores"]["dolly"][method]["last"][0]
        )
    assert "fedamole" in (out / "results.md").read_text()
    # The same config section parses from YAML overrides (the `fedjax-lora run` path).
    from fedjax_lora import config as config_lib

    cfg = config_lib.load(None, ["eval.generation={metric: choice_accuracy, max_new_tokens: 4}"])
    assert dataclasses.asdict(cfg.eval.generation)["metric"] == "choice_accuracy"
