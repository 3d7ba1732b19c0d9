r"""Personalized collaborative fine-tuning with trust-weighted aggregation.

Wagner, Fan & Jaggi, "Personalized Collaborative Fine-Tuning for On-Device Large Language
Models", COLM 2024 (arXiv:2404.09753); the reference is `epfml/personalized-collaborative-llms`
(pre-refactor `src/optim/lora.py`).

Every client holds its own LoRA adapters (independent `A` draws, `B = 0`), its own AdamW state and
its own learning-rate schedule. A round is `F` local steps (`LocalTraining.steps`, the reference's
`trust_freq = 25`); rounds `1 … R₀-1` are local warm-up, and every round `r ≥ R₀`
(`first_aggregation_round`; the reference's 100 pre-training steps are `R₀ = 4` rounds of 25)
ends with the personalized aggregation

.. math:: \theta_i \leftarrow \sum_j W[i, j]\, \theta_j,

with a row-stochastic trust matrix `W` recomputed from scratch from what the round has just
produced (`fedjax_lora.aggregation.trust`), followed by the evaluation. Only adapters are mixed;
optimizer states and schedules stay local. Rules:

- `pcl-weights` (Strategy 1): `W = softmax(S)`, `S` the mean row-wise cosine of the adapters;
- `pcl-val` (Strategy 2): `W = softmax(-P)`, `P[i, j]` = perplexity of model `j` on client
  `i`'s validation windows (`engine.crosseval`, in the same compiled round);
- `pcl-pred` (Strategy 3): `W = softmax(-10 · D̂)`, `D̂` the row-L1-normalised L1 distances of
  the top-100 sparsified last-position logits on the shared reference sequences;
- `pcl-oracle` ("theoretical"): `W[i, j] ∝ ⟨m_i, m_j⟩` from the known data mixtures `m`;
- `pcl-fedavg` (the reference's `naive`): `W = 1/N` on the same schedule and initialisation.

Communication per client and aggregating round (`trust_comm`): every rule uploads the client's
adapters and downloads its mixture; `pcl-val`'s cross-evaluation downloads the `N − 1` peers'
adapters instead (the client evaluates and mixes them) and uploads its perplexity row `[N]`;
`pcl-pred` also uploads its last-position logits on the reference set `[S, V]` and downloads the
`N − 1` peers'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora.aggregation import (
    Exchange,
    fedavg_aggregator,
    logits_exchange,
    model_exchange,
    tree_bytes,
    trust_aggregator,
)
from fedjax_lora.algorithms.base import Algorithm, Comm, exchanged, federated, num_rows, per_client
from fedjax_lora.algorithms.problem import Problem, SideData
from fedjax_lora.algorithms.registry import register
from fedjax_lora.engine.crosseval import CrossEval, attention_dropout_only, make_cross_eval
from fedjax_lora.settings import TrustOptions

__all__ = ["RULES", "TrustOptions", "trust_weighted"]

RULES = ("weights", "validation", "prediction", "oracle", "fedavg")
"""Trust rules of `trust_weighted` (`fedavg`: uniform mixing, the reference's `naive`)."""


def _cross_eval(problem: Problem, options: TrustOptions) -> CrossEval:
    graphdef, key = problem.graphdef, None
    if options.eval_attention_dropout is not None:
        graphdef = attention_dropout_only(
            problem.graphdef, problem.template, problem.base, options.eval_attention_dropout
        )
        key = jax.random.key(options.eval_seed)
    return make_cross_eval(graphdef, problem.eval_batch_size, problem.strategy, dropout_key=key)


def trust_weighted(
    problem: Problem, rule: str, options: TrustOptions = TrustOptions(), *, name: str | None = None
) -> Algorithm:
    """The trust-weighted algorithm with trust rule `rule` (one of `RULES`).

    `validation` reads the problem's `val` evaluation set, `prediction` its side data's
    `reference` sequences `[S, T]`, `oracle` its side data's `mixtures [N, K]` (`SideData`,
    declared by the registered `pcl-pred` and `pcl-oracle`). Every client draws its own initial
    adapters.
    """
    if rule not in RULES:
        raise ValueError(f"unknown trust rule {rule!r}; expected one of {RULES}")
    cross = _cross_eval(problem, options)
    n = problem.num_clients
    if rule == "fedavg":
        aggregator, inputs = fedavg_aggregator(), None
    else:
        aggregator = trust_aggregator(rule, **options.rule_options(rule, n))
        inputs = _inputs(problem, rule, options, cross)
    return federated(
        name or f"pcl-{rule}",
        problem,
        aggregator,
        shared_init=False,
        inputs=inputs,
        first_round=options.first_aggregation_round,
        client_eval=cross.client_eval,
        comm=trust_comm(problem, rule),
    )


def trust_comm(problem: Problem, rule: str) -> Comm:
    """The bytes of rule `rule` per client and aggregating round (module docstring)."""
    if rule not in ("validation", "prediction"):
        return exchanged("all")

    def comm(clients) -> Exchange:
        n = num_rows(clients.params)
        model = tree_bytes(clients.params) // n
        if rule == "validation":
            cross = model_exchange(model, n)
            return per_client(Exchange(cross.upload + 4 * n, cross.download), n)
        vocab = nnx.merge(problem.graphdef, problem.template, problem.base).config.vocab_size
        logits = logits_exchange((problem.side["reference"].shape[0], vocab), n, np.float32)
        return per_client(Exchange(model + logits.upload, model + logits.download), n)

    return comm


def _inputs(problem: Problem, rule: str, options: TrustOptions, cross: CrossEval):
    """The aggregation-input hook of `rule`: `(data, clients, eval_sets, base) -> inputs`."""
    if rule == "weights":
        return None
    if rule == "validation":
        if "val" not in problem.eval_sets:
            raise ValueError("pcl-val needs a 'val' evaluation set in the problem")
        return lambda data, clients, eval_sets, base: {
            "ppl": cross.perplexity(clients.params, eval_sets["val"], base)
        }
    if rule == "prediction":
        if "reference" not in problem.side:
            raise ValueError(
                "pcl-pred needs shared reference sequences (Problem.side['reference']); the data "
                "source must provide a reference set"
            )
        vocab = nnx.merge(problem.graphdef, problem.template, problem.base).config.vocab_size
        if options.top_k > vocab:
            raise ValueError(
                f"trust.top_k={options.top_k} exceeds the model's vocabulary of {vocab} tokens; "
                "set trust.top_k to at most the vocabulary size"
            )
        reference = problem.side["reference"]
        return lambda data, clients, eval_sets, base: {
            "logits": cross.reference_logits(clients.params, reference, base)
        }
    if "mixtures" not in problem.side:
        raise ValueError(
            "pcl-oracle needs the clients' known data mixtures (Problem.side['mixtures'])"
        )
    mixtures = jnp.asarray(problem.side["mixtures"], jnp.float32)
    return lambda data, clients, eval_sets, base: {"mixtures": mixtures}


def _registered(rule: str, name: str):
    def factory(problem: Problem, options: TrustOptions) -> Algorithm:
        return trust_weighted(problem, rule, options, name=name)

    return factory


for _name, _rule, _doc in (
    ("pcl-weights", "weights", "Trust from adapter (LoRA weight) similarity (Strategy 1)"),
    ("pcl-val", "validation", "Trust from peers' perplexity on own validation (Strategy 2)"),
    ("pcl-pred", "prediction", "Trust from predictions on a shared reference set (Strategy 3)"),
    ("pcl-oracle", "oracle", "Trust from the known data mixtures ('theoretical' weights)"),
    ("pcl-fedavg", "fedavg", "Uniform mixing on the trust-weighted schedule (`naive`)"),
):
    register(
        _name,
        _registered(_rule, _name),
        TrustOptions(),
        doc=_doc,
        side=SideData(reference=_rule == "prediction", mixtures=_rule == "oracle"),
    )
