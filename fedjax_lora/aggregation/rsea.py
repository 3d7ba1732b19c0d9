r"""Reverse selection-based expert assignment (RSEA) of FedAMoLE.

Zhang, Qin, Wu, Hou & Deng, "Personalized Federated Fine-Tuning for LLMs via Data-Driven
Heterogeneous Model Architectures" (arXiv:2411.19128, v2 Problem C.1; reference code
`zyc140345/FedAMoLE`, `node.py::Server.dispatch_experts`, `optimize.py`).

Every AMoLE module (`fedjax_lora.amole`) has a pool of `E` domain experts; each round the server
decides, per module, which `C` clients hold which experts. *Experts choose clients*: with the
clients' mean token embeddings `t̄_c = mean_x W_tok x` and the expert keys
`ū_e = mean_{c holds e} mean_x A_e x` (both `∈ R^r`, computed by the clients on their auxiliary
data),

.. math:: S_{e,c} = \langle ū_e, t̄_c \rangle / \sqrt{r}, \qquad
          P_{e,\cdot} = \mathrm{softmax}_c(S_{e,\cdot}),

and the assignment `X ∈ {0,1}^{E×C}` solves

.. math:: \max_X \sum_{e,c} P_{e,c} X_{e,c} \quad \text{s.t.} \quad
          \sum_c X_{e,c} = k, \qquad m \le \sum_e X_{e,c} \le M.

The constraint matrix is the incidence matrix of the complete bipartite graph experts × clients,
so it is totally unimodular and every vertex of the LP relaxation is integral: a simplex solve of
the LP (HiGHS dual simplex) is an exact, deterministic solution of the binary program (the
reference solves the ILP with SCIP). Everything here runs on the host, outside `jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.sparse
from jax.typing import ArrayLike
from jaxtyping import Array, Bool, Float, Real

__all__ = ["assign", "check_feasible", "expert_keys", "random_assignment", "scores"]


def check_feasible(
    num_experts: int, num_clients: int, clients_per_expert: int, min_experts: int, max_experts: int
) -> None:
    """Raises `ValueError` naming the violated counting condition unless an assignment exists.

    With `E` experts, `C` clients, `k = clients_per_expert`, `m ≤ M` the per-client bounds, a 0/1
    matrix with row sums `k` and column sums in `[m, M]` exists iff `0 ≤ k ≤ C`, `0 ≤ m ≤ M` and
    `C·m ≤ E·k ≤ C·min(M, E)` (Gale–Ryser with the balanced column sums `⌊Ek/C⌋`, `⌈Ek/C⌉`).
    """
    e, c, k, lo, hi = num_experts, num_clients, clients_per_expert, min_experts, max_experts
    if e < 1 or c < 1:
        raise ValueError(f"need at least one expert and one client, got E={e}, C={c}")
    if not 0 <= k <= c:
        raise ValueError(
            f"clients_per_expert={k} must lie in [0, C={c}]: an expert picks k distinct clients"
        )
    if not 0 <= lo <= hi:
        raise ValueError(f"need 0 <= min_experts <= max_experts, got {lo} and {hi}")
    if c * lo > e * k:
        raise ValueError(
            f"infeasible assignment: C·min_experts = {c}·{lo} = {c * lo} exceeds "
            f"E·clients_per_expert = {e}·{k} = {e * k} (too few expert slots for every client to "
            "hold min_experts); raise clients_per_expert or the expert count, or lower min_experts"
        )
    if e * k > c * min(hi, e):
        raise ValueError(
            f"infeasible assignment: E·clients_per_expert = {e}·{k} = {e * k} exceeds "
            f"C·min(max_experts, E) = {c}·{min(hi, e)} = {c * min(hi, e)} (more expert slots than "
            "the clients can hold); lower clients_per_expert or raise max_experts"
        )


def assign(
    P: Real[ArrayLike, "e c"], clients_per_expert: int, min_experts: int, max_experts: int
) -> Bool[np.ndarray, "e c"]:
    """The exact RSEA assignment: `bool [E, C]` maximising `Σ P·X` with every expert held by exactly
    `clients_per_expert` clients and every client holding `min_experts … max_experts` experts.

    P: scores `[E, C]` (any reals; RSEA passes the softmax over clients). Solved as an LP with
    HiGHS' dual simplex, whose basic optimal solutions are integral here (total unimodularity);
    the result is checked to be integral and feasible. Deterministic for a given `P`; among equally
    good assignments, which one is returned is the solver's (deterministic) choice.
    Raises `ValueError` (naming the violated counting condition) when no assignment exists.
    """
    scores_ = np.asarray(P, np.float64)
    if scores_.ndim != 2:
        raise ValueError(f"P must be [experts, clients], got shape {scores_.shape}")
    e, c = scores_.shape
    check_feasible(e, c, clients_per_expert, min_experts, max_experts)
    # Variable X[i, j] sits at i·C + j. Rows: Σ_j X[i, j] = k; columns: m ≤ Σ_i X[i, j] ≤ M.
    rows = scipy.sparse.kron(scipy.sparse.eye(e), np.ones((1, c)))
    cols = scipy.sparse.kron(np.ones((1, e)), scipy.sparse.eye(c))
    result = scipy.optimize.linprog(
        -scores_.ravel(),
        A_ub=scipy.sparse.vstack([cols, -cols]).tocsr(),
        b_ub=np.concatenate([np.full(c, float(max_experts)), np.full(c, -float(min_experts))]),
        A_eq=rows.tocsr(),
        b_eq=np.full(e, float(clients_per_expert)),
        bounds=(0.0, 1.0),
        method="highs-ds",
    )
    if result.status != 0:
        raise RuntimeError(f"the assignment LP failed: {result.message}")
    x = result.x.reshape(e, c)
    X = np.rint(x).astype(bool)
    if np.max(np.abs(x - X)) > 1e-6:
        raise RuntimeError("the assignment LP returned a fractional vertex (not expected: TU)")
    held = X.sum(axis=0)
    ok = np.all(X.sum(axis=1) == clients_per_expert) and np.all(held >= min_experts)
    if not (ok and np.all(held <= max_experts)):
        raise RuntimeError("the rounded assignment violates the constraints")
    return X


def expert_keys(
    expert_means: Real[ArrayLike, "c e r"], held: Bool[ArrayLike, "c e"]
) -> Float[Array, "e r"]:
    """`ū_e = Σ_c X[c, e] ū_{c,e} / Σ_c X[c, e]`: each expert's key, the mean of its holders'
    uploaded embeddings (0 for an expert nobody holds).

    expert_means: `[C, E, r]` per-client mean expert embeddings (rows of non-held experts are
    ignored); held: `bool [C, E]`. Returns `[E, r]`.
    """
    u = jnp.asarray(expert_means, jnp.float32)
    h = jnp.asarray(held, jnp.float32)
    total = jnp.einsum("ce,cer->er", h, u, precision=jax.lax.Precision.HIGHEST)
    return total / jnp.maximum(h.sum(0), 1.0)[:, None]


def scores(
    token_means: Real[ArrayLike, "c r"],
    expert_means: Real[ArrayLike, "c e r"],
    held: Bool[ArrayLike, "c e"],
) -> Float[Array, "e c"]:
    """RSEA's expert-to-client preferences `P = softmax_c(ū T̄ᵀ / √r)`, shape `[E, C]`.

    token_means: `[C, r]` the clients' mean token embeddings `t̄_c`; expert_means `[C, E, r]` and
    held `bool [C, E]` as in `expert_keys`. The softmax runs over clients (each expert ranks the
    clients), not over experts.
    """
    t = jnp.asarray(token_means, jnp.float32)
    keys = expert_keys(expert_means, held)
    s = jnp.einsum("er,cr->ec", keys, t, precision=jax.lax.Precision.HIGHEST)
    return jax.nn.softmax(s / jnp.sqrt(t.shape[-1]), axis=1)


def random_assignment(
    rng: np.random.Generator,
    num_experts: int,
    num_clients: int,
    clients_per_expert: int,
    min_experts: int,
    max_experts: int,
) -> np.ndarray:
    """Round 0 (and the `random` dispatch ablation): `assign(softmax_c(U))` with
    `U ~ U(0, 1)^{E×C}`, as the reference does; a random feasible `bool [E, C]` assignment."""
    u = rng.uniform(size=(num_experts, num_clients))
    p = np.exp(u) / np.exp(u).sum(axis=1, keepdims=True)
    return assign(p, clients_per_expert, min_experts, max_experts)
