r"""The federated LoRA baselines of CoMiGS (Fan et al., arXiv:2409.13931, Tables 2 and 4; spec §3),
on the problem's LoRA:

- `ffa-lora` (Sun, Qin, Li & Ding, "Improving LoRA in Privacy-preserving Federated Learning",
  ICLR 2024): every `A` frozen at the shared init, `B` trained and averaged (uniform mean; `A` is
  identical everywhere). `train_attention_a=True` is the CoMiGS icml reference: only the MLP `A`
  frozen, the attention `A` trained and averaged.
- `fedsa-lora` (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
  Learning", ICLR 2025), faithful: every `A` averaged, every `B` local. (The icml reference's
  `fedsalora` averages both, which is `fedavg`.)
- `hetlora` (Cho et al., EMNLP 2024): per-client ranks, the rank self-pruning regulariser
  `λ_p ‖A_tail‖_F ‖B_tail‖_F`, self-pruning at upload, sparsity-weighted aggregation and truncation
  to each client's rank (`fedjax_lora.aggregation.hetlora`).
- `flexlora` (Bai et al., NeurIPS 2024): per-client ranks, the token-weighted average of the full
  updates `ΔW_i = s_i A_i B_i`, SVD back to each client's rank (`fedjax_lora.aggregation.flexlora`).

**Per-client ranks** (hetlora, flexlora; `ranks[i] = r_i`, the spec's Table 2 settings such as
`[16, 32, 32, 32]`). The LoRA on the projections `ranked.targets` (default every MLP projection;
the reference's attention LoRA keeps its fixed rank and is averaged uniformly, spec §6.15) is
replaced by `RankedLoRA` modules of rank `r_max = max_i r_i` with `ranked`'s α and scaling. Client
`i` uses its first `r_i` ranks with its own scale `s_i` (`α/√r_i` for the reference's rsLoRA
scaling, as its per-client `LoRALinear`): its per-rank `rank_scale` (`RankScale`, per client, never
trained) holds `s_i` on the active ranks and 0 on padded and pruned ones, and

.. math:: δ(x) = \big((\mathrm{dropout}(x) A) ⊙ m_i\big) B,

so inactive columns of `A` and rows of `B` get no gradient and stay at zero (the aggregators zero
them again at every truncation). All clients start from the server's init truncated to their rank.
Client `i` uploads and downloads its LoRA at rank `r_i` (`ranked_comm`: `r_i (d_in + d_out)`
elements per ranked projection, every other adapter in full).

**Server optimizer, FedProx, SCAFFOLD and the global rule** (`docs/aggregation.md`).
`ffa-lora` and `fedsa-lora` take `server_opt` (`aggregation.server_opt`: an optax step on the
pseudo-gradient of the averaged part, `B` and `A` respectively) and `scaffold` (SCAFFOLD's
control variates over that part, `algorithms.scaffold.federated_scaffold`); `ffa-lora` also
FedProx's `proximal_mu` (its trained tensors are all global; FedSA-LoRA's local `B` has no global
model to stay close to). The config's `aggregation.reduction` / `aggregation.dp` replace the mean
of that part (not with `scaffold`: its server also averages the control updates). HetLoRA's and
FlexLoRA's servers take them in place of their weighted sums (their `GlobalPart` rebuilds the
aggregator with the rule): HetLoRA's over the truncated factors (median and trimmed mean over the
clients holding each rank), FlexLoRA's over the products `ΔW_i`; DP clips each client's update
from the factors it downloaded, the weights dropped (`aggregation.hetlora`,
`aggregation.flexlora`). Not with `reference_weights` / `reference_accumulator` (weights of the
replaced sum).

| method | `server_opt` | `proximal_mu` | `scaffold` | `reduction` | `dp` |
|---|---|---|---|---|---|
| `ffa-lora` | ✓ `B` | ✓ | ✓ `B` | ✓ `B` | ✓ `B` |
| `fedsa-lora` | ✓ `A` | – | ✓ `A` | ✓ `A` | ✓ `A` |
| `hetlora` | – | – | – | ✓ factors, over each rank's holders | ✓ factors, uniform weights |
| `flexlora` | – | – | – | ✓ `ΔW_i` | ✓ `ΔW_i`, uniform weights |

**Evaluation** (`evaluate`, every method here): `"local"` (default), each client's model after its
local steps and before the server average, as the CoMiGS reference evaluates every method;
`"aggregated"`: after aggregation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_lora.aggregation import (
    Aggregator,
    Exchange,
    flexlora_aggregator,
    hetlora_aggregator,
    rank_exchange,
)
from fedjax_lora.aggregation.hetlora import tail_mask, tail_norm_product
from fedjax_lora.aggregation.masks import masked_aggregator, path_names
from fedjax_lora.aggregation.ranks import map_ranked, truncate
from fedjax_lora.algorithms.base import (
    Algorithm,
    Capabilities,
    ClientProgram,
    Evaluate,
    GlobalPart,
    Method,
    aggregating,
    build,
    federated,
    local_training,
    num_rows,
)
from fedjax_lora.algorithms.problem import Problem, Surgery, install
from fedjax_lora.algorithms.registry import register
from fedjax_lora.algorithms.scaffold import federated_scaffold, local_learning_rate
from fedjax_lora.engine.loss import AUX_LOSS
from fedjax_lora.engine.state import ClientState, init_clients
from fedjax_lora.engine.train import make_client_update
from fedjax_lora.errors import ConfigError
from fedjax_lora.lora import LoRA, LoRAConfig, attach_adapters
from fedjax_lora.models.layers import Adapter, ClientFrozen, dropout
from fedjax_lora.settings import ServerOptimizer

__all__ = [
    "MLP_LORA",
    "FFALoRAOptions",
    "FedSALoRAOptions",
    "FlexLoRAOptions",
    "HetLoRAOptions",
    "RankScale",
    "RankedLoRA",
    "fedsa_lora",
    "ffa_frozen",
    "ffa_lora",
    "flexlora",
    "hetlora",
    "rank_scales",
    "ranked_comm",
    "ranked_run_surgery",
    "ranked_surgery",
    "with_ranks",
]

MLP_LORA = LoRAConfig(targets=(r"re:.*\.mlp\..*",), rank=16, alpha=16.0, scaling="alpha/sqrt(r)")
"""The reference's ranked LoRA: every MLP projection (GPT-2 `c_fc`, `c_proj`; Llama `gate_proj`,
`up_proj`, `down_proj`), rank 16, `α = 16`, `s = α/√r`."""


class RankScale(ClientFrozen):
    """`f32 [r_max]`: a client's LoRA scale on its active ranks, 0 on padded and pruned ones
    (per client, never trained; HetLoRA's server zeroes pruned ranks)."""


class RankedLoRA(LoRA):
    """A rank-`r_max` LoRA of which a client uses the ranks where `rank_scale > 0`:
    `δ(x) = ((dropout(x) A) ⊙ rank_scale) B`. With `prune_coef > 0` it sows HetLoRA's
    regulariser `prune_coef · ‖A_tail‖_F ‖B_tail‖_F` (tail ratio `keep`) as an `aux_loss`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoRAConfig,
        *,
        prune_coef: float = 0.0,
        keep: float = 0.99,
    ):
        super().__init__(in_features, out_features, config)
        self.rank_scale = RankScale(np.full((config.rank,), config.scale, np.float32))
        self.prune_coef = prune_coef
        self.keep = keep

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        a, b, m = self.a[...], self.b[...], self.rank_scale[...]
        if self.prune_coef > 0:
            tail = tail_mask(m > 0, self.keep)
            self.sow(nnx.Intermediate, AUX_LOSS, self.prune_coef * tail_norm_product(a, b, tail))
        h = dropout(x.astype(a.dtype), self.dropout, rngs)
        return ((h @ a) * m.astype(a.dtype)) @ b


def ranked_surgery(config: LoRAConfig, *, prune_coef: float = 0.0, keep: float = 0.99) -> Surgery:
    """The surgery putting `RankedLoRA` modules of `config` on `config.targets`, replacing any
    LoRA there (`install`)."""
    make = lambda i, o: RankedLoRA(i, o, config, prune_coef=prune_coef, keep=keep)
    return lambda model: attach_adapters(model, config.targets, make, replace=True)


def with_ranks(
    problem: Problem,
    ranks: Sequence[int] | None = None,
    ranked: LoRAConfig = MLP_LORA,
    *,
    prune_coef: float = 0.0,
    keep: float = 0.99,
) -> Problem:
    """The problem with `RankedLoRA` modules of rank `max(ranks)` on `ranked.targets`
    (`ranked_surgery`; default ranks: `ranked.rank` for every client)."""
    ranks = _check_ranks(problem, ranks, ranked)
    config = dataclasses.replace(ranked, rank=max(ranks))
    return install(problem, ranked_surgery(config, prune_coef=prune_coef, keep=keep))


def ranked_run_surgery(options: HetLoRAOptions | FlexLoRAOptions) -> Surgery:
    """The model surgery of a hetlora or flexlora run with these method options: `ranked_surgery`
    at the largest rank, e.g. to rebuild its model for export."""
    ranked = options.ranked
    return ranked_surgery(dataclasses.replace(ranked, rank=max(options.ranks or [ranked.rank])))


def _check_ranks(problem: Problem, ranks: Sequence[int] | None, ranked: LoRAConfig) -> list[int]:
    n = problem.num_clients
    ranks = [ranked.rank] * n if ranks is None else [int(r) for r in ranks]
    if len(ranks) != n or min(ranks) < 1:
        raise ValueError(f"ranks must give a rank >= 1 for each of the {n} clients, got {ranks}")
    return ranks


def rank_scales(frozen: nnx.State, ranks: Sequence[int], ranked: LoRAConfig) -> nnx.State:
    """The clients' frozen state of a `with_ranks` problem (`frozen`: its template): every
    `RankScale` `[N, r_max]` holding `s_i` (the scale of `ranked` at rank `r_i`) on the first
    `r_i` ranks, 0 after."""
    r_max = max(ranks)
    per_client = np.zeros((len(ranks), r_max), np.float32)
    for i, r in enumerate(ranks):
        per_client[i, :r] = dataclasses.replace(ranked, rank=r).scale
    return jax.tree.map(lambda _: jnp.asarray(per_client), frozen)


def ranked_comm(clients: ClientState) -> Exchange:
    """Bytes per client (int64 `[N]`, up = down) of HetLoRA and FlexLoRA: client `i`'s ranked
    LoRA truncated to its rank `r_i` (its active `rank_scale` entries; `aggregation.rank_exchange`),
    its other adapters in full; the rank scales (`ClientState.frozen`) stay with the server."""
    ranks = {
        path[:-1]: np.asarray(var.get_value() > 0).sum(-1)
        for path, var in nnx.to_flat_state(clients.frozen)
        if path[-1] == "rank_scale"
    }
    total = np.zeros(num_rows(clients.params), np.int64)
    for path, var in nnx.to_flat_state(clients.params):
        value = var.get_value()
        if path[:-1] not in ranks or path[-1] not in ("a", "b"):
            total += value[0].size * value.dtype.itemsize
            continue
        one = {path[-1]: jax.ShapeDtypeStruct(value.shape[1:], value.dtype)}
        total += [rank_exchange(one, int(r)).upload for r in ranks[path[:-1]]]
    return Exchange(total, total.copy())


def _ranked_method(
    name: str,
    problem: Problem,
    ranks: Sequence[int] | None,
    ranked: LoRAConfig,
    prune_coef: float,
    keep: float,
    server: Callable[[Aggregator | None], Aggregator],
    inputs: Callable[..., dict] | None = None,
    evaluate: Evaluate = "local",
) -> Algorithm:
    """The method of a ranked server (`server(rule)`: the aggregator, with a global rule in place
    of its mean, or its own with None) on a `with_ranks` problem: clients start from one shared
    draw truncated to their ranks (their `RankScale`s in `ClientState.frozen`, `rank_scales`), the
    server sees and updates the rank scales with the adapters (`aggregating(frozen=True)`);
    `evaluate`: the local models before the server average, or the aggregated ones. The
    server's `GlobalPart` (`policy` `all`: every uploaded tensor) rebuilds it with the problem's
    `GlobalRule` (`with_global_rule`)."""
    ranks = _check_ranks(problem, ranks, ranked)
    problem = with_ranks(problem, ranks, ranked, prune_coef=prune_coef, keep=keep)
    scales = rank_scales(problem.frozen, ranks, ranked)
    tx = problem.tx()
    cfg = problem.training
    update = make_client_update(
        problem.graphdef, tx, cfg, max_windows=problem.train.max_windows(cfg.seq_len)
    )

    def init(key):
        clients = init_clients(
            problem.template, tx, problem.num_clients, key, shared_init=True, frozen=scales
        )
        merged = nnx.merge_state(clients.params, scales)
        merged = map_ranked(merged, lambda _, a, b, m: (*truncate(a, b, m > 0), m))
        return clients._replace(params=nnx.split_state(merged, Adapter, ...)[0])

    serve = lambda aggregator: aggregating(aggregator, inputs=inputs, comm=ranked_comm, frozen=True)
    part = GlobalPart("all", lambda rule: serve(server(rule)))
    method = Method(
        name,
        ClientProgram(init, local_training(problem, update)),
        serve(server(None))._replace(global_part=part),
        evaluate=evaluate,
        capabilities=Capabilities(cohorts=False),
    )
    return build(problem, method)


@dataclasses.dataclass(frozen=True)
class HetLoRAOptions:
    """ranks: the clients' ranks `r_i` (default `ranked.rank` for every client), on
    `ranked.targets`. prune_coef: the regulariser weight `λ_p` (the reference sweeps 0.05, 0.005,
    0.0005). keep: the tail ratio `γ`. self_prune: self-pruning at upload. reference_weights:
    sparsity weights from the reference's per-matrix norms instead of `‖ΔW_i‖_F`. evaluate:
    module docstring."""

    ranks: tuple[int, ...] | None = None
    ranked: LoRAConfig = MLP_LORA
    prune_coef: float = 0.005
    keep: float = 0.99
    self_prune: bool = True
    reference_weights: bool = False
    evaluate: Evaluate = "local"


@dataclasses.dataclass(frozen=True)
class FlexLoRAOptions:
    """ranks, ranked: as `HetLoRAOptions`. merge_alpha: `16` is the reference's `16/r` merge rate
    (None: the average as is). reference_accumulator: the reference server's accumulator reset,
    only the last client's update (`fedjax_lora.aggregation.flexlora`). evaluate: module
    docstring."""

    ranks: tuple[int, ...] | None = None
    ranked: LoRAConfig = MLP_LORA
    merge_alpha: float | None = None
    reference_accumulator: bool = False
    evaluate: Evaluate = "local"


@dataclasses.dataclass(frozen=True)
class FFALoRAOptions:
    """train_attention_a: the attention's `A` trained and averaged (the icml reference); only the
    MLP `A` frozen. evaluate: module docstring. server_opt: a server optimizer on the averaged
    part (`aggregation.server_opt`). proximal_mu > 0: FedProx's proximal term on the local loss
    (every trained tensor is global). scaffold: SCAFFOLD's control variates over the trained `B`
    (`algorithms.scaffold`, option II); local_lr: its `η_l` (None: `optimizer.lr`)."""

    train_attention_a: bool = False
    evaluate: Evaluate = "local"
    server_opt: ServerOptimizer = ServerOptimizer()
    proximal_mu: float = 0.0
    scaffold: bool = False
    local_lr: float | None = None

    def __post_init__(self):
        if not self.proximal_mu >= 0:
            raise ValueError(
                f"proximal_mu must be >= 0 (0: no proximal term), got {self.proximal_mu!r}"
            )


@dataclasses.dataclass(frozen=True)
class FedSALoRAOptions:
    """evaluate: module docstring. server_opt: a server optimizer on the `A`s
    (`aggregation.server_opt`). scaffold: SCAFFOLD's control variates over the `A`s
    (`algorithms.scaffold`, option II; the local `B`s train uncorrected); local_lr: its `η_l`
    (None: `optimizer.lr`)."""

    evaluate: Evaluate = "local"
    server_opt: ServerOptimizer = ServerOptimizer()
    scaffold: bool = False
    local_lr: float | None = None


def _refuse(option: str, why: str) -> None:
    raise ConfigError(
        f"{option} = true {why}, which aggregation.reduction / aggregation.dp replace; unset one"
    )


def hetlora(problem: Problem, options: HetLoRAOptions = HetLoRAOptions()) -> Algorithm:
    """HetLoRA with per-client ranks (module docstring, `HetLoRAOptions`): the rank self-pruning
    regulariser, self-pruning at upload, sparsity-weighted aggregation."""
    o = options

    def server(rule: Aggregator | None) -> Aggregator:
        if rule is not None and o.reference_weights:
            _refuse("method_options.hetlora.reference_weights", "sets the weights of the sum")
        return hetlora_aggregator(o.keep, o.self_prune, o.reference_weights, rule)

    return _ranked_method(
        "hetlora", problem, o.ranks, o.ranked, o.prune_coef, o.keep, server, evaluate=o.evaluate
    )


def flexlora(problem: Problem, options: FlexLoRAOptions = FlexLoRAOptions()) -> Algorithm:
    """FlexLoRA with per-client ranks (module docstring, `FlexLoRAOptions`): the token-count
    weighted average of the full updates, SVD back to each client's rank."""
    inputs = lambda data, clients, eval_sets, base: {"weights": data.token_counts()}
    o = options

    def server(rule: Aggregator | None) -> Aggregator:
        if rule is not None and o.reference_accumulator:
            why = "keeps the last client's term of the weighted sum"
            _refuse("method_options.flexlora.reference_accumulator", why)
        return flexlora_aggregator(o.merge_alpha, o.reference_accumulator, rule)

    return _ranked_method(
        "flexlora", problem, o.ranks, o.ranked, 0.0, 0.99, server, inputs, o.evaluate
    )


def ffa_frozen(names: Sequence[str], train_attention_a: bool = False) -> bool:
    """Whether FFA-LoRA freezes the adapter leaf at path `names`: every LoRA `A`, except those
    of the attention with `train_attention_a` (the icml reference)."""
    attention = any("attn" in name for name in names)
    return names[-1] == "a" and not (train_attention_a and attention)


def ffa_lora(problem: Problem, options: FFALoRAOptions = FFALoRAOptions()) -> Algorithm:
    """FFA-LoRA: every LoRA `A` frozen at the shared init (`ffa_frozen`), `B` averaged uniformly
    after every round; a frozen `A` is never touched (not even averaged)."""
    frozen = lambda names: ffa_frozen(names, options.train_attention_a)
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if frozen(path_names(path)) else "trained", params
    )
    local_lr = options.local_lr
    if options.scaffold:  # η_l from the problem's optimizer, before it becomes a transformation
        local_lr = local_learning_rate(problem, local_lr, "ffa-lora")
    tx = optax.multi_transform({"trained": problem.tx(), "frozen": optax.set_to_zero()}, labels)
    problem = dataclasses.replace(problem, optimizer=tx)
    trained = lambda names: not frozen(names)
    common = dict(
        evaluate=options.evaluate,
        proximal_mu=options.proximal_mu or None,
        policy=trained,
        server_opt=options.server_opt,
    )
    if options.scaffold:
        return federated_scaffold(
            "ffa-lora", problem, masked_aggregator(trained), local_lr=local_lr, **common
        )
    return federated("ffa-lora", problem, masked_aggregator(trained), shared_init=True, **common)


def fedsa_lora(problem: Problem, options: FedSALoRAOptions = FedSALoRAOptions()) -> Algorithm:
    """FedSA-LoRA: every LoRA `A` averaged uniformly after every round, every `B` kept local; all
    clients start from the same adapters. `server_opt`: a server optimizer on the `A`s;
    `scaffold`: control variates over the `A`s."""
    common = dict(evaluate=options.evaluate, policy="fedsa", server_opt=options.server_opt)
    if options.scaffold:
        return federated_scaffold(
            "fedsa-lora",
            problem,
            masked_aggregator("fedsa"),
            local_lr=options.local_lr,
            **common,
        )
    return federated("fedsa-lora", problem, masked_aggregator("fedsa"), shared_init=True, **common)


register("ffa-lora", ffa_lora, FFALoRAOptions())
register("fedsa-lora", fedsa_lora, FedSALoRAOptions())
register("hetlora", hetlora, HetLoRAOptions())
register("flexlora", flexlora, FlexLoRAOptions())
