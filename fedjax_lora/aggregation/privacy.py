r"""The privacy accountant of client-level DP: `ε` of `R` rounds of the sampled Gaussian mechanism.

Each round of DP-FedAvg (`aggregation.dp`) is a Gaussian mechanism of noise multiplier `z` on the
clipped sum over a cohort; with client sampling of rate :math:`q = K / N` (`data.cohort_size` `K`
of the population `N`) it is the *sampled* Gaussian mechanism, and `R` rounds compose. The
accountant is Google's `dp-accounting` (Rényi DP, Mironov 2017; Mironov, Talwar & Zhang 2019 for
the sampled Gaussian), called as

- `sampling="poisson"`: `PoissonSampledDpEvent(q, GaussianDpEvent(z))` composed `R` times (each
  client joins each round independently with probability `q`, as McMahan et al. 2018 assume);
- `sampling="fixed"`: `SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z))` (a cohort of
  exactly `K` drawn without replacement, as `engine/cohort.py` draws; RDP of Wang, Balle &
  Kasiviswanathan 2019, replace-one adjacency).

`check_certifiable` refuses settings the accountant cannot certify, with a `ConfigError` naming the
setting and the fix. Under adaptive clipping `z` is the total noise multiplier (update and count,
Andrew et al. 2021), which is what the accountant must see.
"""

from __future__ import annotations

import math
from typing import Literal

from fedjax_lora.errors import ConfigError

__all__ = ["Sampling", "check_certifiable", "epsilon"]

Sampling = Literal["poisson", "fixed"]


def check_certifiable(
    noise_multiplier: float,
    delta: float,
    num_clients: int,
    cohort_size: int | None = None,
    rounds: int = 1,
) -> None:
    """Raises `ConfigError` unless `ε` can be certified: `z > 0`, `0 < δ < 1/N` (a larger `δ`
    allows releasing one client's data outright), `1 ≤ K ≤ N`, `R ≥ 1`."""
    if not noise_multiplier > 0:
        raise ConfigError(
            f"dp: noise_multiplier = {noise_multiplier} certifies no privacy (epsilon is "
            "infinite); set noise_multiplier > 0 (e.g. 1.0) or turn DP off"
        )
    if not 0 < delta < 1 / num_clients:
        raise ConfigError(
            f"dp: delta = {delta} must be in (0, 1/num_clients = {1 / num_clients:.3g}); "
            f"a delta of 1/num_clients or more allows leaking one client outright (use e.g. "
            f"{_suggested_delta(num_clients):.0e})"
        )
    if cohort_size is not None and not 1 <= cohort_size <= num_clients:
        raise ConfigError(
            f"dp: cohort_size = {cohort_size} must be in [1, num_clients = {num_clients}]"
        )
    if rounds < 1:
        raise ConfigError(f"dp: rounds = {rounds} must be >= 1")


def _suggested_delta(num_clients: int) -> float:
    """The power of ten at or below `1/N²`: the usual `δ ≪ 1/N`."""
    return 10.0 ** math.floor(math.log10(1 / num_clients**2))


def _accountant(
    noise_multiplier: float,
    num_clients: int,
    cohort_size: int | None,
    rounds: int,
    delta: float,
    sampling: Sampling,
):
    """The checked `(RdpAccountant, one round's DpEvent)`; the neighbouring relation follows the
    sampling (add/remove-one for Poisson or no sampling, replace-one without replacement)."""
    import dp_accounting
    from dp_accounting import rdp

    check_certifiable(noise_multiplier, delta, num_clients, cohort_size, rounds)
    cohort_size = cohort_size or num_clients
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    relation = dp_accounting.NeighboringRelation
    if cohort_size == num_clients:
        return rdp.RdpAccountant(), gaussian
    if sampling == "poisson":
        event = dp_accounting.PoissonSampledDpEvent(cohort_size / num_clients, gaussian)
        return rdp.RdpAccountant(), event
    if sampling == "fixed":
        event = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, cohort_size, gaussian)
        return rdp.RdpAccountant(neighboring_relation=relation.REPLACE_ONE), event
    raise ConfigError(f"dp: sampling = {sampling!r}; expected 'poisson' or 'fixed'")


def epsilon(
    noise_multiplier: float,
    num_clients: int,
    cohort_size: int | None,
    rounds: int,
    delta: float,
    sampling: Sampling = "poisson",
) -> float:
    """`ε` after `R = rounds` rounds at `δ` (RDP accountant, module docstring), with
    `K = cohort_size` of `N = num_clients` clients per round (None: all); the per-round report
    calls it with `rounds = t`. Refuses what `check_certifiable` refuses."""
    accountant, event = _accountant(
        noise_multiplier, num_clients, cohort_size, rounds, delta, sampling
    )
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))
