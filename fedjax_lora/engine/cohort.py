r"""Cross-device populations: `P` clients, a cohort of `K` sampled per round.

The population's state is one stacked `ClientState` with leading axis `P` (adapters, optimizer
states, keys, counters: for LoRA r=8 on q, v of a 4-layer d=128 model, 16k adapter values and 32k
Adam moments, ≈200 KB per client, so thousands fit on one device). Inside the compiled round:

1. `idx = sample(fold_in(sim_key, round), weights)`: `K` distinct client indices (sorted), drawn
   from the simulation's key and the round counter, so a resumed run draws the same cohorts;
2. `take(tree, idx)` gathers the cohort's rows (`jnp.take`): state, training data, evaluation
   windows;
3. the cohort trains and is aggregated on its own (`K`-client trees: FedAvg over the cohort, trust
   matrices `K × K`);
4. `put(population, idx, cohort)` scatters the rows back (`.at[idx].set`); idle clients keep
   everything they had. With a server model (FedAvg) the aggregated model is also written to the
   idle clients' adapters, and with a global part (FedSA-LoRA's `A`, FFA-LoRA's `B`) that part: a
   client that joins a later round starts from the newest global model, as FedAvg's download at
   the start of a round (McMahan et al., 2017); its local tensors stay its own.

Sampling, without replacement:

- `uniform`: every `K`-subset equally likely, inclusion probability `K / P`;
- `tokens`: successive sampling proportional to the training-token counts `w`: the first member
  is client `i` with probability `w_i / Σ w`, each next one proportional to `w` among the clients
  not yet drawn (`jax.random.choice(..., replace=False, p=w/Σw)`, Gumbel top-k). For `K = 1` the
  inclusion probability is exactly `w_i / Σ w`; for larger `K` it is the successive-sampling
  inclusion probability (larger clients are drawn more often, but not proportionally).

Optimizer state of a client across rounds it does not take part in (`optimizer`):

- `keep` (default): the client's optax state (Adam moments, schedule step count) stays in the
  population and continues when the client is drawn again (the full-participation behaviour:
  "optimizer states stay local"); a schedule therefore advances with the client's own steps, not
  with the global round;
- `reset`: a fresh `tx.init(params)` every time the client is drawn (stateless clients, the usual
  cross-device FedAvg setting).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from fedjax_lora.typing import PyTree

COHORT_SAMPLING = ("uniform", "tokens")
COHORT_OPTIMIZER = ("keep", "reset")
KEY_STREAM = 0x636F68  # the simulation key is fold_in(init key, KEY_STREAM): client init unchanged


@dataclasses.dataclass(frozen=True)
class Cohort:
    """`size` clients per round out of the population (see the module docstring).

    sampling: `uniform` or `tokens` (successive sampling by training-token counts);
    optimizer: `keep` or `reset` the optimizer state of a client between its participations.
    """

    size: int
    sampling: Literal["uniform", "tokens"] = "uniform"
    optimizer: Literal["keep", "reset"] = "keep"

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"cohort size must be >= 1 clients, got {self.size}")
        if self.sampling not in COHORT_SAMPLING:
            raise ValueError(
                f"cohort sampling must be one of {COHORT_SAMPLING}, got {self.sampling!r}"
            )
        if self.optimizer not in COHORT_OPTIMIZER:
            raise ValueError(
                f"cohort optimizer must be one of {COHORT_OPTIMIZER}, got {self.optimizer!r}"
            )

    def check(self, num_clients: int) -> None:
        """Raises when the population is smaller than the cohort."""
        if self.size > num_clients:
            raise ValueError(
                f"cohort size {self.size} is larger than the population of {num_clients} "
                "clients; lower data.cohort_size or add clients"
            )

    def sample(self, key: jax.Array, weights: jax.Array) -> jax.Array:
        """`int32 [K]`: sorted distinct client indices; `weights [P]` (token counts) are used by
        `tokens` sampling only."""
        num_clients = weights.shape[0]
        p = None if self.sampling == "uniform" else weights / jnp.sum(weights)
        idx = jax.random.choice(key, num_clients, (self.size,), replace=False, p=p)
        return jnp.sort(idx).astype(jnp.int32)

    def prepare(self, clients: Any, tx: optax.GradientTransformation) -> Any:
        """The drawn clients' state before training: optimizer state re-initialised under
        `reset`, unchanged under `keep`."""
        if self.optimizer == "keep":
            return clients
        return clients._replace(opt_state=jax.vmap(tx.init)(clients.params))


def take(tree: PyTree, idx: jax.Array) -> PyTree:
    """Rows `idx` of every leaf (the leading client axis): `jnp.take(leaf, idx, axis=0)`."""
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


def put(population: PyTree, idx: jax.Array, rows: PyTree) -> PyTree:
    """`population` with rows `idx` replaced by `rows` (`leaf.at[idx].set(rows)`)."""
    return jax.tree.map(lambda x, r: x.at[idx].set(r), population, rows)


def merge(
    population: Any,
    idx: jax.Array,
    cohort: Any,
    shared: PyTree | bool = False,
    applied: jax.Array | bool = True,
) -> Any:
    """The population `ClientState` after a round: the cohort's rows scattered back (`put`); then,
    after an aggregation (`applied`), every client receives the entries the server made one model
    for the cohort, its row 0, as a client downloads the current global part when it is next
    drawn. `shared`: those entries: False none (personalised aggregation), True every adapter
    (FedAvg's server model), or a mask tree of the adapters (`aggregation.masks.global_mask`, e.g.
    FedSA-LoRA's `A`)."""
    out = put(population, idx, cohort)
    if shared is False:
        return out
    if shared is True:
        shared = jax.tree.map(lambda _: True, out.params)
    params = jax.tree.map(
        lambda x, r, m: jnp.where(m & applied, jnp.broadcast_to(r[0], x.shape), x),
        out.params,
        cohort.params,
        shared,
    )
    return out._replace(params=params)
