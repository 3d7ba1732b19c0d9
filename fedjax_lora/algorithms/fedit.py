r"""FedIT and FedIT-FT, the LoRA baselines of FedAMoLE (Zhang et al., arXiv:2411.19128, §4
baselines; reference `zyc140345/FedAMoLE`, `train_baselines.py` with `fed_avg`, and with
`--do_ft` for the "-FT" variant; FedIT itself is Zhang et al., "Towards Building the Federated
GPT: Federated Instruction Tuning", ICASSP 2024).

Every client trains one LoRA adapter (the problem's, e.g. `r = 8`, `α = 16`, dropout 0.05 on
`q_proj`/`v_proj`) from the same initial draw; after every round the server averages the factors
separately, :math:`A \leftarrow \frac1N \sum_c A_c`, :math:`B \leftarrow \frac1N \sum_c B_c`,
and every client continues from the average (FedAvg).

- `fedit`: the reported model is the **aggregated global adapter** after each round.
- `fedit-ft`: the same training; the reported model is each client's adapter **after its local
  training of the round, before aggregation**, i.e. the global adapter of the previous round
  fine-tuned for `training.steps` local steps (200 in the reference) on the client's data. This
  is the personalised counterpart of FedAMoLE, which is also tested after local training (spec
  §7.11: comparing FedAMoLE against plain FedIT inflates the gain).

As for FedAMoLE, the optimizer (Adam in the reference) is re-created at every round and its
learning rate is `lr · decay^{r-1}` in round `r` (`round_decay`, 0.99); `round_decay=None` keeps
the problem's optimizer state and schedule across rounds instead.

The federated toolbox (`docs/aggregation.md`): the adapter is the global part.

| `server_opt` | `proximal_mu` | `scaffold` | `reduction` | `dp` |
|---|---|---|---|---|
| ✓ | – (the optimizer is re-created every round) | – | ✓ | ✓ |
"""

from __future__ import annotations

import dataclasses

from fedjax_lora.aggregation import fedavg_aggregator
from fedjax_lora.algorithms.base import (
    Algorithm,
    Evaluate,
    Method,
    aggregating,
    build,
    federated,
    round_decayed,
    scaled_tx,
    standard_client,
)
from fedjax_lora.algorithms.problem import Problem
from fedjax_lora.algorithms.registry import register
from fedjax_lora.settings import ServerOptimizer

__all__ = ["FedITOptions", "fedit", "fedit_ft"]


@dataclasses.dataclass(frozen=True)
class FedITOptions:
    """round_decay: learning-rate factor per round, the optimizer re-created every round (the
    FedAMoLE reference's schedule); None: the problem's optimizer runs on across rounds.
    server_opt: a server optimizer on the averaged adapter (`aggregation.server_opt`)."""

    round_decay: float | None = 0.99
    server_opt: ServerOptimizer = ServerOptimizer()

    def __post_init__(self):
        if self.round_decay is not None and not 0 < self.round_decay <= 1:
            raise ValueError(f"round_decay must be in (0, 1] or None, got {self.round_decay}")


def _fedit(problem: Problem, options: FedITOptions, name: str, evaluate: Evaluate) -> Algorithm:
    """FedAvg of one LoRA adapter (the server model) on FedIT's schedule; `evaluate`: the
    aggregated global adapter or every client's locally fine-tuned one."""
    if options.round_decay is None:
        return federated(
            name,
            problem,
            fedavg_aggregator(),
            shared_init=True,
            evaluate=evaluate,
            server_model=True,
            policy="all",
            server_opt=options.server_opt,
        )
    tx = scaled_tx(problem)
    client = round_decayed(
        standard_client(problem, shared_init=True, tx=tx), tx, options.round_decay
    )
    server = aggregating(
        fedavg_aggregator(), server_model=True, policy="all", server_opt=options.server_opt
    )
    return build(problem, Method(name, client, server, evaluate=evaluate))


def fedit(problem: Problem, options: FedITOptions = FedITOptions()) -> Algorithm:
    """FedIT: FedAvg of one LoRA adapter, tested on the global adapter."""
    return _fedit(problem, options, "fedit", "aggregated")


def fedit_ft(problem: Problem, options: FedITOptions = FedITOptions()) -> Algorithm:
    """FedIT-FT: FedIT's training, every client tested after its local fine-tuning (before
    aggregation)."""
    return _fedit(problem, options, "fedit-ft", "local")


register("fedit", fedit, FedITOptions())
register("fedit-ft", fedit_ft, FedITOptions())
