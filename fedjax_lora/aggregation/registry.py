"""Every aggregator the project has, by name, with example side inputs for the test battery.

Adding an aggregator is one `AGGREGATORS` line: its factory with production defaults, and a
builder of random but valid `inputs` (`(numpy_rng, num_clients) -> inputs`) so that the shared
battery `fedjax_lora.aggregation.testing.check_aggregator` (shapes, dtypes, jit, row-stochastic
mixing, NumPy reference, and the `properties` the entry declares) runs over it in
`tests/test_aggregation.py`. New side inputs also get an `INPUT_CLIENT_AXES` entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from fedjax_lora.aggregation.core import (
    Aggregator,
    Inputs,
    fedavg_aggregator,
    local_aggregator,
    trust_aggregator,
)
from fedjax_lora.aggregation.dp import dp_aggregator
from fedjax_lora.aggregation.experts import expert_aggregator
from fedjax_lora.aggregation.masks import masked_aggregator
from fedjax_lora.aggregation.robust import (
    krum_aggregator,
    median_aggregator,
    trimmed_mean_aggregator,
)
from fedjax_lora.aggregation.server_opt import fedadagrad, fedadam, fedavgm, fedyogi
from fedjax_lora.aggregation.testing import PROPERTIES

__all__ = ["AGGREGATORS", "AggregatorEntry", "make_aggregator"]


class AggregatorEntry(NamedTuple):
    """factory: builds the aggregator with its defaults; example_inputs: `(rng, n) -> inputs`;
    properties: which of the battery's optional properties hold by definition
    (`testing.PROPERTIES`: `permutation_equivariant`, `mixing`, `within_range`; default all, as
    for every mixing rule)."""

    factory: Callable[..., Aggregator]
    example_inputs: Callable[[np.random.Generator, int], Inputs]
    properties: tuple[str, ...] = PROPERTIES


def _no_inputs(rng: np.random.Generator, n: int) -> Inputs:
    del rng, n
    return {}


def _token_counts(rng: np.random.Generator, n: int) -> Inputs:
    return {"weights": rng.integers(1_000, 100_000, n).astype(np.float32)}


def _perplexities(rng: np.random.Generator, n: int) -> Inputs:
    return {"ppl": rng.uniform(1.0, 5.0, (n, n)).astype(np.float32)}


def _reference_logits(rng: np.random.Generator, n: int) -> Inputs:
    return {"logits": rng.normal(0.0, 3.0, (n, 4, 160)).astype(np.float32)}


def _mixtures(rng: np.random.Generator, n: int) -> Inputs:
    m = rng.uniform(size=(n, 3)) * (rng.uniform(size=(n, 3)) < 0.7)  # some zero shares
    m[:, 0] += 1e-3  # no empty client
    return {"mixtures": (m / m.sum(axis=1, keepdims=True)).astype(np.float32)}


def _holders(rng: np.random.Generator, n: int) -> Inputs:
    held = rng.uniform(size=n) < 0.5
    held[rng.integers(n)] = True  # at least one holder
    return {"holders": held}


# Coordinate-wise reductions pick clients per coordinate: not one mixing matrix.
_REDUCTION = ("permutation_equivariant", "within_range")
# A server step (optimizer, added noise) leaves the clients' range.
_STEP = ("permutation_equivariant",)

AGGREGATORS: dict[str, AggregatorEntry] = {
    "local": AggregatorEntry(local_aggregator, _no_inputs),
    "fedavg": AggregatorEntry(fedavg_aggregator, _token_counts),
    "trust_weights": AggregatorEntry(functools.partial(trust_aggregator, "weights"), _no_inputs),
    "trust_validation": AggregatorEntry(
        functools.partial(trust_aggregator, "validation"), _perplexities
    ),
    "trust_prediction": AggregatorEntry(
        functools.partial(trust_aggregator, "prediction"), _reference_logits
    ),
    "trust_oracle": AggregatorEntry(functools.partial(trust_aggregator, "oracle"), _mixtures),
    "experts": AggregatorEntry(expert_aggregator, _holders),
    "masked": AggregatorEntry(masked_aggregator, _token_counts),
    "median": AggregatorEntry(median_aggregator, _token_counts, _REDUCTION),
    "trimmed_mean": AggregatorEntry(trimmed_mean_aggregator, _token_counts, _REDUCTION),
    "krum": AggregatorEntry(krum_aggregator, _token_counts),
    "multi_krum": AggregatorEntry(functools.partial(krum_aggregator, m=None), _token_counts),
    "fedavgm": AggregatorEntry(fedavgm, _no_inputs, _STEP),
    "fedadam": AggregatorEntry(fedadam, _no_inputs, _STEP),
    "fedyogi": AggregatorEntry(fedyogi, _no_inputs, _STEP),
    "fedadagrad": AggregatorEntry(fedadagrad, _no_inputs, _STEP),
    "dp_fedavg": AggregatorEntry(dp_aggregator, _no_inputs, _STEP),
}


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """The registered aggregator `name` (`AGGREGATORS`), with `options` passed to its factory."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; expected one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[name].factory(**options)
