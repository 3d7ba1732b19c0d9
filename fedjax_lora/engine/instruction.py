r"""Instruction-tuning evaluation (FedAMoLE, Zhang et al., arXiv:2411.19128, §5.4; reference
`zyc140345/FedAMoLE`, `node.py::Client.test`, `model/loss.py::ClsLMLoss`, `evaluation.py`).

Every client is evaluated with its own adapters on its own held-out examples, clients mapped by
the problem's `Strategy` (one compiled program, no Python loop over clients):

- **generation** (Dolly, Natural Instructions): greedy decoding of every prompt
  (`models.generate.greedy_decode`, key/value cache, up to `max_new_tokens`, stopping at EOS);
  the new tokens come back to the host, are cut at the first EOS, decoded to text and scored
  against the reference response with ROUGE-L F1 (`rouge_l`: by default the paper's, from the PyPI
  `rouge` 1.0.1 package the reference calls; Google's `rouge-score` as an option); a client's
  score is the mean over its examples.
- **multiple choice** (SNLI): for every example and choice `c` (the template's label words,
  tokenized + EOS), the mean token cross-entropy of the choice's tokens given the prompt,
  :math:`\ell_c = \frac{1}{|c|}\sum_{t \in c} -\log p(c_t \mid \text{prompt}, c_{<t})`; the
  prediction is :math:`\arg\min_c \ell_c` and a client's accuracy the fraction of its examples
  predicted right. All choices of a batch of prompts run in one forward.

Prompts are stored **left-padded** to a common length (`[N, P, T]` with a mask; a prompt longer
than the set's length keeps its last tokens) and the example axis is padded to a multiple of the
evaluation batch size with invalid rows; shapes stay static.

Scores are fractions in `[0, 1]` (the paper reports them × 100). The paper's headline number is
the relative improvement over the best baseline (`relative_improvement`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora.engine.loss import token_cross_entropy
from fedjax_lora.models.generate import greedy_decode

__all__ = [
    "ChoiceSet",
    "GenerationSet",
    "TextTask",
    "left_pad",
    "make_choice_set",
    "make_client_task",
    "make_generation_set",
    "relative_improvement",
    "rouge_l",
    "score_generations",
    "score_task",
]

Metric = Literal["rouge_l", "choice_accuracy"]
METRICS = ("rouge_l", "choice_accuracy")
Rouge = Literal["rouge", "rouge-score"]
ROUGES = ("rouge", "rouge-score")


class GenerationSet(NamedTuple):
    """Every client's prompts to continue: `prompts int32 [N, P, T]` left-padded,
    `prompt_mask bool [N, P, T]` (1 on real tokens), `valid bool [N, P]` (padding examples 0)."""

    prompts: jax.Array
    prompt_mask: jax.Array
    valid: jax.Array


class ChoiceSet(NamedTuple):
    """Every client's multiple-choice examples: left-padded `prompts int32 [N, P, T]` with
    `prompt_mask`, `valid bool [N, P]`, gold `labels int32 [N, P]`, and the choices (same for
    every client) `choices int32 [N, K, C]` right-padded with `choice_mask bool [N, K, C]`."""

    prompts: jax.Array
    prompt_mask: jax.Array
    valid: jax.Array
    labels: jax.Array
    choices: jax.Array
    choice_mask: jax.Array


@dataclasses.dataclass(frozen=True)
class TextTask:
    """How a problem's `task` evaluation set is scored.

    metric: `rouge_l` (greedy generation, a `GenerationSet`) or `choice_accuracy` (lowest
    per-choice loss, a `ChoiceSet`). max_new_tokens, eos_id: the decoding budget and stop token.
    references: per client, the reference response of each valid example (generation).
    decode: token ids (without EOS) -> text, e.g. `lambda ids: tok.decode(ids,
    skip_special_tokens=True)`. rouge: the ROUGE-L implementation (`rouge_l`): `rouge` (PyPI
    `rouge` 1.0.1, the paper's) or `rouge-score`.
    """

    metric: Metric
    max_new_tokens: int = 128
    eos_id: int | None = None
    references: tuple[tuple[str, ...], ...] = ()
    decode: Callable[[Sequence[int]], str] | None = None
    rouge: Rouge = "rouge"

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"task metric must be one of {METRICS}, got {self.metric!r}")
        if self.rouge not in ROUGES:
            raise ValueError(f"eval.rouge must be one of {ROUGES}, got {self.rouge!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.metric == "rouge_l" and (self.decode is None or self.eos_id is None):
            raise ValueError("a rouge_l task needs decode (ids -> text) and eos_id")

    def check(self, task_set: GenerationSet | ChoiceSet) -> None:
        """Raises when `task_set` (host or device arrays, not traced) does not fit this task
        (kind, reference counts)."""
        want = GenerationSet if self.metric == "rouge_l" else ChoiceSet
        if not isinstance(task_set, want):
            raise ValueError(
                f"metric {self.metric!r} needs a {want.__name__}, got {type(task_set).__name__}"
            )
        if self.metric == "rouge_l":
            counts = np.asarray(task_set.valid).sum(1)
            if len(self.references) != len(counts) or any(
                len(r) != c for r, c in zip(self.references, counts, strict=True)
            ):
                raise ValueError(
                    f"references per client {[len(r) for r in self.references]} do not match the "
                    f"valid prompts per client {counts.tolist()}"
                )


def left_pad(seqs: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens int32 [S, length], mask bool [S, length])`: every sequence right-aligned; one
    longer than `length` keeps its last `length` tokens (the end of a prompt is what the model
    continues)."""
    tokens = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        s = list(s)[-length:]
        if not s:
            raise ValueError(f"sequence {i} is empty; every prompt needs at least one token")
        tokens[i, length - len(s) :] = s
        mask[i, length - len(s) :] = True
    return tokens, mask


def _stack_prompts(
    prompts: Sequence[Sequence[Sequence[int]]], batch_size: int, max_prompt_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-client prompt token lists -> left-padded `[N, P, T]`, mask, valid `[N, P]`, with `P`
    the largest client's count rounded up to a multiple of `batch_size` and `T` the longest
    prompt capped at `max_prompt_tokens`."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every client needs at least one evaluation example")
    longest = max(len(s) for client in prompts for s in client)
    length = min(longest, max_prompt_tokens)
    count = max(len(p) for p in prompts)
    count += (-count) % batch_size
    n = len(prompts)
    tokens = np.zeros((n, count, length), np.int32)
    mask = np.zeros((n, count, length), bool)
    valid = np.zeros((n, count), bool)
    for i, client in enumerate(prompts):
        t, m = left_pad(client, length)
        tokens[i, : len(client)], mask[i, : len(client)], valid[i, : len(client)] = t, m, True
    return tokens, mask, valid


def make_generation_set(
    prompts: Sequence[Sequence[Sequence[int]]], batch_size: int, max_prompt_tokens: int
) -> GenerationSet:
    """A `GenerationSet` from per-client lists of prompt token ids."""
    tokens, mask, valid = _stack_prompts(prompts, batch_size, max_prompt_tokens)
    return GenerationSet(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(valid))


def make_choice_set(
    prompts: Sequence[Sequence[Sequence[int]]],
    labels: Sequence[Sequence[int]],
    choices: Sequence[Sequence[int]],
    batch_size: int,
    max_prompt_tokens: int,
) -> ChoiceSet:
    """A `ChoiceSet` from per-client prompt token ids and gold choice indices, and the token ids
    of every choice (each including its EOS)."""
    tokens, mask, valid = _stack_prompts(prompts, batch_size, max_prompt_tokens)
    gold = np.zeros(valid.shape, np.int32)
    for i, lab in enumerate(labels):
        lab = np.asarray(lab, np.int64)
        if lab.shape != (len(prompts[i]),) or lab.min() < 0 or lab.max() >= len(choices):
            raise ValueError(
                f"client {i}: need one label in [0, {len(choices)}) per prompt, got {lab.tolist()}"
            )
        gold[i, : len(lab)] = lab
    if not choices or min(len(c) for c in choices) == 0:
        raise ValueError("every choice needs at least one token")
    width = max(len(c) for c in choices)
    ids = np.zeros((len(choices), width), np.int32)
    cmask = np.zeros((len(choices), width), bool)
    for k, c in enumerate(choices):
        ids[k, : len(c)], cmask[k, : len(c)] = c, True
    n = len(prompts)
    return ChoiceSet(
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jnp.asarray(valid),
        jnp.asarray(gold),
        jnp.asarray(np.broadcast_to(ids, (n, *ids.shape))),
        jnp.asarray(np.broadcast_to(cmask, (n, *cmask.shape))),
    )


def _batched(x: jax.Array, batch_size: int) -> jax.Array:
    return x.reshape(x.shape[0] // batch_size, batch_size, *x.shape[1:])


def make_client_task(
    graphdef: nnx.GraphDef, batch_size: int, task_set: GenerationSet | ChoiceSet, task: TextTask
) -> Callable[..., dict[str, jax.Array]]:
    """The per-client evaluation of a task set: `fn(params, *task_set_fields, base)` for one
    client's rows, `batch_size` examples at a time (`lax.map`), dropout off. Generation returns
    `{"generated": int32 [P, max_new_tokens]}` (scored on the host, `score_task`); multiple
    choice returns `{"accuracy": f32 []}`. (`TextTask.check` validates the set on the host.)"""

    if isinstance(task_set, GenerationSet):

        def client_generate(params, prompts, prompt_mask, valid, base):
            def one(batch):
                model = nnx.merge(graphdef, params, base)
                p, m, v = batch
                # Padding examples have no real token: finished from the start.
                m = m & v[:, None]
                return greedy_decode(model, p, m, task.max_new_tokens, eos_id=task.eos_id)

            args = tuple(_batched(a, batch_size) for a in (prompts, prompt_mask, valid))
            out = jax.lax.map(one, args)
            return {"generated": out.reshape(prompts.shape[0], task.max_new_tokens)}

        return client_generate

    def client_choice(params, prompts, prompt_mask, valid, labels, choices, choice_mask, base):
        k, c = choices.shape
        t = prompts.shape[1]

        def one(batch):
            model = nnx.merge(graphdef, params, base)
            p, m = batch
            b = p.shape[0]
            # [b, K, T + C]: left-padded prompt, then the right-padded choice.
            seq = jnp.concatenate(
                [
                    jnp.broadcast_to(p[:, None], (b, k, t)),
                    jnp.broadcast_to(choices[None], (b, k, c)),
                ],
                axis=-1,
            ).reshape(b * k, t + c)
            mask = jnp.concatenate(
                [
                    jnp.broadcast_to(m[:, None], (b, k, t)),
                    jnp.broadcast_to(choice_mask[None], (b, k, c)),
                ],
                axis=-1,
            ).reshape(b * k, t + c)
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            logits = model(seq[:, :-1], positions=positions[:, :-1], attention_mask=mask[:, :-1])
            ce = token_cross_entropy(logits, seq[:, 1:])
            is_choice = jnp.concatenate([jnp.zeros((k, t), bool), choice_mask], axis=-1)
            weights = jnp.broadcast_to(is_choice[None], (b, k, t + c)).reshape(b * k, t + c)
            weights = weights[:, 1:].astype(jnp.float32)
            loss = jnp.sum(ce * weights, -1) / jnp.maximum(jnp.sum(weights, -1), 1.0)
            return loss.reshape(b, k)

        losses = jax.lax.map(
            one, (_batched(prompts, batch_size), _batched(prompt_mask, batch_size))
        )
        pred = jnp.argmin(losses.reshape(-1, k), axis=-1)
        hits = jnp.sum((pred == labels) & valid)
        return {"accuracy": hits / jnp.maximum(jnp.sum(valid), 1)}

    return client_choice


def rouge_l(prediction: str, reference: str, implementation: Rouge = "rouge") -> float:
    """ROUGE-L F1 of one prediction against one reference.

    `rouge` (default, the paper's; reference `evaluation.py::rouge_score`): the PyPI `rouge` 1.0.1
    package, `Rouge().get_scores(prediction, reference)[0]["rouge-l"]["f"]`: both texts split
    into sentences at ".", whitespace tokens, case kept, the summary-level union LCS of Lin (2004),
    `F = 2PR / (P + R + 1e-8)` with `P`, `R` the union-LCS count over the numbers of *distinct*
    words of prediction and reference (the package's exclusive n-gram sets); an empty prediction,
    or one the package refuses (`ValueError`: no sentence left, e.g. "..."), scores 0, as in the
    reference.
    `rouge-score`: Google's `RougeScorer(["rougeL"])` (lowercased alphanumeric tokens, one LCS over
    the whole text, no stemming); a blank prediction scores 0."""
    if implementation == "rouge":
        if not prediction:
            return 0.0
        try:
            return float(_rouge().get_scores(prediction, reference)[0]["rouge-l"]["f"])
        except ValueError:
            return 0.0
    if implementation != "rouge-score":
        raise ValueError(f"ROUGE implementation must be one of {ROUGES}, got {implementation!r}")
    if not prediction.strip():
        return 0.0
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


@functools.cache
def _rouge() -> Any:
    from rouge import Rouge as RougeMetric

    return RougeMetric()


@functools.cache
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def decoded_texts(generated: np.ndarray, task: TextTask) -> list[list[str]]:
    """Per client, the text of each valid example's generation: the tokens before the first EOS,
    decoded with `task.decode`."""
    out = []
    for i, refs in enumerate(task.references):
        texts = []
        for row in np.asarray(generated[i, : len(refs)]):
            stop = np.flatnonzero(row == task.eos_id)
            texts.append(task.decode(row[: stop[0] if stop.size else len(row)].tolist()))
        out.append(texts)
    return out


def score_generations(generated: np.ndarray, task: TextTask) -> np.ndarray:
    """`f64 [N]`: every client's mean ROUGE-L F1 over its examples (`generated [N, P, M]`)."""
    texts = decoded_texts(generated, task)
    return np.asarray(
        [
            np.mean([rouge_l(h, r, task.rouge) for h, r in zip(hyps, refs, strict=True)])
            for hyps, refs in zip(texts, task.references, strict=True)
        ]
    )


def score_task(metrics: Mapping[str, Any], task: TextTask) -> dict[str, Any]:
    """Host side: a task set's device metrics -> `{"rouge_l": [N]}` or `{"accuracy": [N]}`."""
    if "generated" in metrics:
        return {"rouge_l": score_generations(np.asarray(metrics["generated"]), task)}
    return {"accuracy": np.asarray(metrics["accuracy"], np.float64)}


def relative_improvement(
    ours: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]]
) -> dict[str, Any]:
    r"""FedAMoLE's headline metric (reference `evaluation.py::summary`): the relative gain of a
    method over the best baseline, in percent.

    With `m_s` the method's score in scenario `s` (accuracy or ROUGE-L, both ×100 or both
    fractions; the paper mixes the two kinds in one mean) and `b_{j,s}` baseline `j`'s:

    - per scenario, against the best baseline *of that scenario*:
      :math:`g_s = 100\,(m_s - \max_j b_{j,s}) / \max_j b_{j,s}`;
    - overall ("Total Average"), against the single baseline with the highest mean over the
      scenarios: :math:`g = 100\,(\bar m - \max_j \bar b_j) / \max_j \bar b_j`,
      :math:`\bar m = \mathrm{mean}_s\, m_s`, :math:`\bar b_j = \mathrm{mean}_s\, b_{j,s}`.

    `ours`: `{scenario: score}`; `baselines`: `{method: {scenario: score}}`, every baseline
    scored in every scenario of `ours`. Returns `{"per_scenario": {s: g_s}, "total": g,
    "best_baseline": j}`; a gain over a best baseline scoring 0 is NaN.
    """
    if not ours or not baselines:
        raise ValueError("relative_improvement needs scores of the method and of >= 1 baseline")
    scenarios = list(ours)
    for method, scores in baselines.items():
        missing = sorted(set(scenarios) - set(scores))
        if missing:
            raise ValueError(f"baseline {method!r} has no score for scenarios {missing}")
    gain = lambda mine, best: 100.0 * (mine - best) / best if best else math.nan
    per = {s: gain(ours[s], max(scores[s] for scores in baselines.values())) for s in scenarios}
    means = {m: float(np.mean([scores[s] for s in scenarios])) for m, scores in baselines.items()}
    best_method = max(means, key=means.get)
    total = gain(float(np.mean([ours[s] for s in scenarios])), means[best_method])
    return {"per_scenario": per, "total": total, "best_baseline": best_method}
