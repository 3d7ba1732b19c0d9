"""The settings dataclasses an experiment config is made of, importable without JAX, so that a
config is checked before JAX loads: `LoRAConfig` (`fedjax_lora.lora`), `LocalTraining`
(`engine.train`), `OptimizerConfig` (`engine.optim`), `Strategy` (`engine.strategy`),
`TrustOptions` (`algorithms.trust_weighted`), `ServerOptimizer` (`aggregation.server_opt`) and
`DPOptions`, `GlobalRule` (`algorithms.base`: how a method's global part is reduced), each also
importable from that module. Their
methods that compute import JAX, optax or the module they serve when called."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import TYPE_CHECKING, Any, Literal

from fedjax_lora.typing import PyTree

if TYPE_CHECKING:
    import optax
    from jax.sharding import Mesh, NamedSharding

    from fedjax_lora.lora import Init

__all__ = [
    "CLIENT_AXIS",
    "MODEL_AXIS",
    "REDUCTIONS",
    "SERVER_OPTIMIZERS",
    "STRATEGIES",
    "DPOptions",
    "GlobalRule",
    "LoRAConfig",
    "LocalTraining",
    "OptimizerConfig",
    "Sampling",
    "Schedule",
    "ServerOptimizer",
    "Strategy",
    "TrustOptions",
]

Sampling = Literal["random", "epoch"]
Schedule = Literal["constant", "cosine", "warmup_cosine", "one_cycle"]
STRATEGIES = ("vmap", "map", "chunked", "sharded")
REDUCTIONS = ("mean", "median", "trimmed_mean", "krum", "multi_krum")
SERVER_OPTIMIZERS = ("none", "sgd", "adam", "yogi", "adagrad")
CLIENT_AXIS = "clients"
MODEL_AXIS = "model"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get LoRA and how.

    targets: patterns over projection paths. A plain pattern matches a path that equals it or ends
        with `.pattern` (PEFT's `target_modules` rule): `"c_attn"` (GPT-2 fused qkv, whole),
        `"c_attn.q"` (its q slice), `"attn.c_proj"`, `"mlp.c_fc"`, `"q_proj"`, `"down_proj"`.
        A pattern starting with `re:` is a regular expression matched against the full path.
    scaling: `"alpha/r"` (Hu et al.; trust-weighted, FedAMoLE) or `"alpha/sqrt(r)"` (rsLoRA;
        CoMiGS).
    init: `"kaiming_uniform"` is PyTorch's `kaiming_uniform_(a=sqrt(5))`, i.e. U(±1/sqrt(fan)), with
        `init_fan="in"` for the reference layout `A: (r, in)` (PEFT, CoMiGS, FedAMoLE) or
        `init_fan="rank"` for `A: (in, r)` (the trust-weighted reference: U(±1/sqrt(r))).
        `"gaussian"` draws A ~ N(0, init_std²) (default std 1/r, PEFT's `gaussian`). B = 0 always.
    """

    targets: tuple[str, ...]
    rank: int = 8
    alpha: float = 16.0
    scaling: Literal["alpha/r", "alpha/sqrt(r)"] = "alpha/r"
    dropout: float = 0.0
    init: Literal["kaiming_uniform", "gaussian"] = "kaiming_uniform"
    init_fan: Literal["in", "rank"] = "in"
    init_std: float | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("LoRAConfig.targets is empty; name at least one projection")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.scaling not in ("alpha/r", "alpha/sqrt(r)"):
            raise ValueError(f"scaling must be 'alpha/r' or 'alpha/sqrt(r)', got {self.scaling!r}")
        if self.init not in ("kaiming_uniform", "gaussian"):
            raise ValueError(f"init must be 'kaiming_uniform' or 'gaussian', got {self.init!r}")
        if self.init_fan not in ("in", "rank"):
            raise ValueError(f"init_fan must be 'in' or 'rank', got {self.init_fan!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        """`s = alpha / r` or `alpha / sqrt(r)`."""
        if self.scaling == "alpha/r":
            return self.alpha / self.rank
        return self.alpha / math.sqrt(self.rank)

    def a_init(self, in_features: int) -> Init:
        """The init rule of `A` for a projection with `in_features` inputs."""
        from fedjax_lora.lora import Init

        if self.init == "gaussian":
            return Init("normal", std=self.init_std or 1.0 / self.rank)
        fan = in_features if self.init_fan == "in" else self.rank
        return Init("uniform", bound=1.0 / math.sqrt(fan))


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """One round of local work per client.

    steps: optimizer steps per round; batch_size: windows per micro-batch; grad_accum: micro-batches
    averaged into one step; seq_len: tokens per window; sampling: `random` windows with
    replacement (the reference codes) or `epoch` iteration; dropout: whether model/LoRA dropout is
    active during training. Memory settings (same numbers, less memory, more compute): `remat`
    recomputes every transformer block's activations in the backward pass (`jax.checkpoint` per
    block); `ce_chunk` evaluates the output head and cross-entropy `ce_chunk` tokens at a time, so
    the `[batch_size, seq_len, vocab]` logits are never materialised (None: all at once).
    packing: `windows` (any offset of the stream) or `examples` (the stream is a run of one-example
    slots of `seq_len + 1` tokens, `data.instruction_packing=examples`; a window is one slot, so
    one example per row; `experiment.build_problem` sets it from the data).
    """

    steps: int
    batch_size: int
    seq_len: int
    grad_accum: int = 1
    sampling: Sampling = "random"
    dropout: bool = True
    remat: bool = False
    ce_chunk: int | None = None
    packing: Literal["windows", "examples"] = "windows"

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"LocalTraining.{name} must be >= 1, got {getattr(self, name)}")
        if self.sampling not in ("random", "epoch"):
            raise ValueError(f"sampling must be 'random' or 'epoch', got {self.sampling!r}")
        if self.packing not in ("windows", "examples"):
            raise ValueError(
                f"training.packing must be 'windows' or 'examples', got {self.packing!r}"
            )
        if self.ce_chunk is not None and self.ce_chunk < 1:
            raise ValueError(
                "LocalTraining.ce_chunk must be >= 1 tokens or None (unchunked), got "
                f"{self.ce_chunk}"
            )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optax optimizer with a schedule over the client's own optimizer steps.

    name: `adamw`, `adam` or `sgd`. schedule: `constant`; `cosine` (to `lr·final_lr_fraction` over
    `total_steps`); `warmup_cosine` (linear warm-up for `warmup_steps`, then cosine); `one_cycle`
    (PyTorch OneCycleLR, see `one_cycle`).
    """

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 2e-3
    schedule: Schedule = "constant"
    total_steps: int = 1000
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    def __post_init__(self):
        if self.name not in ("adamw", "adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.name!r}; choose adamw, adam or sgd")
        if self.schedule not in typing.get_args(Schedule):
            raise ValueError(
                f"unknown schedule {self.schedule!r}; choose constant, cosine, warmup_cosine or "
                "one_cycle"
            )
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")

    def learning_rate(self) -> optax.ScalarOrSchedule:
        """The peak rate, or the schedule over the client's optimizer steps."""
        import optax

        from fedjax_lora.engine.optim import one_cycle

        if self.schedule == "constant":
            return self.lr
        if self.schedule == "cosine":
            return optax.cosine_decay_schedule(self.lr, self.total_steps, self.final_lr_fraction)
        if self.schedule == "warmup_cosine":
            return optax.warmup_cosine_decay_schedule(
                0.0,
                self.lr,
                self.warmup_steps,
                self.total_steps,
                self.lr * self.final_lr_fraction,
            )
        return one_cycle(
            self.lr,
            self.total_steps,
            pct_start=self.pct_start,
            div_factor=self.div_factor,
            final_div_factor=self.final_div_factor,
        )

    @functools.cache  # noqa: B019 - frozen and hashable: equal configs share one optimizer
    def build(self) -> optax.GradientTransformation:
        """The optax transformation (`standard_promotion`: optax is not dtype-strict); equal configs
        return the same object, so functions compiled with it as a static argument are reused."""
        import optax

        from fedjax_lora.engine.optim import standard_promotion

        lr = self.learning_rate()
        if self.name == "adamw":
            opt = optax.adamw(lr, self.b1, self.b2, self.eps, weight_decay=self.weight_decay)
        elif self.name == "adam":
            opt = optax.adam(lr, self.b1, self.b2, self.eps)
        else:
            opt = optax.sgd(lr)
        if self.grad_clip > 0:
            opt = optax.chain(optax.clip_by_global_norm(self.grad_clip), opt)
        return standard_promotion(opt)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How clients are mapped. `chunk_size` is for `chunked`; `inner`, `num_devices` (default:
    all devices) and `model_devices` (devices sharing one client group's base, the `model` mesh
    axis; 1: base replicated) for `sharded`."""

    kind: Literal["vmap", "map", "chunked", "sharded"] = "map"
    chunk_size: int = 4
    inner: Literal["map", "vmap"] = "map"
    num_devices: int | None = None
    model_devices: int = 1

    def __post_init__(self):
        if self.kind not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.kind!r}; choose one of {STRATEGIES}")
        if self.kind == "chunked" and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.inner not in ("map", "vmap"):
            raise ValueError(f"inner must be 'map' or 'vmap', got {self.inner!r}")
        if self.model_devices < 1:
            raise ValueError(f"model_devices must be >= 1, got {self.model_devices}")
        if self.model_devices > 1 and self.kind != "sharded":
            raise ValueError(
                f"model_devices={self.model_devices} shards the base over a device mesh, which "
                "only strategy.kind='sharded' uses; set kind: sharded or model_devices: 1"
            )

    def mesh(self) -> Mesh:
        """The `(clients, model)` mesh over the first `num_devices` devices (all processes'
        devices in a multi-host run), `model_devices` consecutive devices per client group."""
        import jax
        import numpy as np
        from jax.sharding import Mesh

        devices = jax.devices()
        n = self.num_devices or len(devices)
        if n > len(devices):
            raise ValueError(f"strategy asks for {n} devices but only {len(devices)} are visible")
        if n % self.model_devices:
            raise ValueError(
                f"{n} devices cannot form groups of model_devices={self.model_devices}; choose a "
                "divisor of the device count"
            )
        grid = np.asarray(devices[:n]).reshape(n // self.model_devices, self.model_devices)
        return Mesh(grid, (CLIENT_AXIS, MODEL_AXIS))

    def check_clients(self, num_clients: int) -> None:
        """Raises when the client count cannot be split as this strategy needs."""
        if self.kind == "sharded":
            n = self.mesh().shape[CLIENT_AXIS]
            if num_clients % n:
                raise ValueError(
                    f"strategy 'sharded' splits {num_clients} clients over {n} client groups of "
                    f"devices; choose a client count divisible by {n} or set strategy.num_devices "
                    "(or strategy.model_devices)"
                )

    def client_sharding(self) -> NamedSharding | None:
        """Sharding of a stacked client array (client axis over the mesh), or None."""
        from jax.sharding import NamedSharding, PartitionSpec

        if self.kind != "sharded":
            return None
        return NamedSharding(self.mesh(), PartitionSpec(CLIENT_AXIS))

    def place(self, tree: PyTree) -> PyTree:
        """Puts a stacked client tree on devices as this strategy wants it (`sharded`: the client
        axis over the mesh's `clients` axis)."""
        import jax

        from fedjax_lora.engine.strategy import put

        sharding = self.client_sharding()
        return tree if sharding is None else jax.tree.map(lambda x: put(x, sharding), tree)

    def replicate(self, tree: PyTree) -> PyTree:
        """`sharded`: every leaf replicated on the mesh (shared data: reference sequences, a
        replicated base); other strategies: unchanged."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        from fedjax_lora.engine.strategy import put

        if self.kind != "sharded":
            return tree
        sharding = NamedSharding(self.mesh(), PartitionSpec())
        return jax.tree.map(lambda x: put(x, sharding), tree)

    def place_base(self, base: PyTree) -> PyTree:
        """The frozen base on the mesh (`sharded` only): replicated when `model_devices == 1`,
        else every weight sharded over the `model` axis along its largest axis divisible by
        `model_devices` (replicated when none is, e.g. biases of odd width)."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        from fedjax_lora.engine.strategy import put

        if self.kind != "sharded" or self.model_devices == 1:
            return self.replicate(base)
        mesh, m = self.mesh(), self.model_devices

        def place(x):
            axes = [a for a in range(x.ndim) if x.shape[a] % m == 0 and x.shape[a] >= m]
            spec = [None] * x.ndim
            if axes:
                spec[max(reversed(axes), key=lambda a: x.shape[a])] = MODEL_AXIS
            return put(x, NamedSharding(mesh, PartitionSpec(*spec)))

        return jax.tree.map(place, base)


@dataclasses.dataclass(frozen=True)
class TrustOptions:
    """Schedule, evaluation and trust-rule options of the trust-weighted methods.

    first_aggregation_round: first round (1-based) that ends with an aggregation; earlier rounds
      are local warm-up (reference: 100 steps / 25 per round = 4).
    eval_attention_dropout: the paper's evaluation (spec §3.1): attention-probability dropout of
      this rate (the paper: 0.2, its training rate) stays on in every evaluation, reported
      perplexities and trust inputs alike; all other dropouts are off. None: no dropout (the
      config sets it from `eval.attention_dropout`).
    eval_seed: seed of those evaluation dropout masks.
    temperature: softmax temperature of `weights` and `validation` (reference: 1).
    use_loss: `validation` on `log P` (mean CE) instead of perplexity (reference: False).
    top_k, scale: `prediction`'s logit sparsity and score scale (reference: 100, 10).
    top_peers, threshold, min_keep: peer selection (`softmax_trust`; reference variants
      `*-top-k`, `*-thresh`).
    topology: communication graph (`full`, `ring`, `star`, `isolated`).
    """

    first_aggregation_round: int = 1
    eval_attention_dropout: float | None = None
    eval_seed: int = 0
    temperature: float = 1.0
    use_loss: bool = False
    top_k: int = 100
    scale: float = 10.0
    top_peers: int | None = None
    threshold: float | None = None
    min_keep: int = 2
    topology: str = "full"

    def __post_init__(self):
        if self.first_aggregation_round < 1:
            raise ValueError(
                f"first_aggregation_round must be >= 1, got {self.first_aggregation_round}"
            )
        rate = self.eval_attention_dropout
        if rate is not None and (isinstance(rate, bool) or not 0.0 <= rate < 1.0):
            raise ValueError(
                f"eval_attention_dropout must be a rate in [0, 1) or None, got {rate!r} "
                "(the paper: 0.2; set it as eval.attention_dropout)"
            )

    def rule_options(self, rule: str, num_clients: int) -> dict[str, Any]:
        """The keyword options of `trust_aggregator(rule, ...)`."""
        from fedjax_lora.aggregation import topology

        shared = {
            "top_peers": self.top_peers,
            "threshold": self.threshold,
            "min_keep": self.min_keep,
            "adjacency": None if self.topology == "full" else topology(self.topology, num_clients),
        }
        own = {
            "weights": {"temperature": self.temperature},
            "validation": {"temperature": self.temperature, "use_loss": self.use_loss},
            "prediction": {"top_k": self.top_k, "scale": self.scale},
            "oracle": {},
        }[rule]
        return {**own, **shared}


@dataclasses.dataclass(frozen=True)
class DPOptions:
    """Client-level differential privacy of a method's global part (DP-FedAvg, McMahan et al.
    2018; `fedjax_lora.aggregation.dp`), certified by the accountant
    (`fedjax_lora.aggregation.privacy`).

    clip_norm: `C`, each client's update of the global part clipped to it in L2 norm (the initial
      one under adaptive clipping); noise_multiplier: `z`, Gaussian noise `N(0, (z C / K)^2)` on
      the mean of the `K` clients of a round (the total `z` the accountant sees);
      adaptive_quantile: `γ` in (0, 1), adapt `C` towards that quantile of the update norms
      (Andrew et al. 2021; None: fixed `C`); clip_lr: `η_C`; count_noise_std: `σ_b` of the
      unclipped count (None: `K / 20`); delta: `δ` at which `ε` is reported (in `(0, 1/N)`);
      sampling: the accountant's model of the cohort draw, `fixed` (exactly `K` of `N` without
      replacement, as `data.cohort_size` draws) or `poisson`.
    """

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    adaptive_quantile: float | None = None
    clip_lr: float = 0.2
    count_noise_std: float | None = None
    delta: float = 1e-5
    sampling: Literal["fixed", "poisson"] = "fixed"

    def __post_init__(self):
        checks = (
            ("clip_norm", self.clip_norm > 0, "> 0"),
            ("noise_multiplier", self.noise_multiplier >= 0, ">= 0"),
            ("clip_lr", self.clip_lr > 0, "> 0"),
        )
        for field, ok, want in checks:
            if not ok:
                raise ValueError(f"dp.{field} must be {want}, got {getattr(self, field)!r}")
        q = self.adaptive_quantile
        if q is not None and not 0.0 < q < 1.0:
            raise ValueError(f"dp.adaptive_quantile must be in (0, 1) or null, got {q!r}")
        if self.count_noise_std is not None and not self.count_noise_std > 0:
            raise ValueError(f"dp.count_noise_std must be > 0 or null, got {self.count_noise_std}")
        if self.sampling not in ("fixed", "poisson"):
            raise ValueError(f"dp.sampling must be 'fixed' or 'poisson', got {self.sampling!r}")


@dataclasses.dataclass(frozen=True)
class GlobalRule:
    """How every method with a global part (a tensor set averaged into one server model: FedAvg,
    FedIT, FFA-LoRA's `B`, FedSA-LoRA's `A`, CoMiGS's generalist, the soft prompts, FedAMoLE's
    shared expert and `W_tok`, FDLoRA's global LoRA) reduces it
    (`algorithms.base.with_global_rule`; the config's `aggregation` section).

    reduction: `mean` (the method's own rule), or a Byzantine-robust one
      (`fedjax_lora.aggregation.robust`): `median` (coordinate-wise), `trimmed_mean` (drop
      `⌊β K⌋` values at each end), `krum` / `multi_krum` (`f` Byzantine clients; multi-Krum
      averages `m` clients, None: `K − f`); dp: client-level DP of the mean (`DPOptions`; None:
      off; only with `reduction = mean`).
    """

    reduction: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"] = "mean"
    beta: float = 0.2
    f: int = 1
    m: int | None = None
    dp: DPOptions | None = None

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"aggregation.reduction must be one of {REDUCTIONS}, got {self.reduction!r}"
            )
        if not 0.0 <= self.beta < 0.5:
            raise ValueError(f"aggregation.beta must be in [0, 0.5), got {self.beta!r}")
        if self.f < 0 or (self.m is not None and self.m < 1):
            raise ValueError(
                f"aggregation.f must be >= 0 and aggregation.m >= 1 (or null), got f = {self.f}, "
                f"m = {self.m}"
            )
        if self.dp is not None and self.reduction != "mean":
            raise ValueError(
                f"aggregation.dp needs aggregation.reduction = mean (the accountant certifies "
                f"the clipped mean, not {self.reduction!r}); unset one of them"
            )

    @property
    def default(self) -> bool:
        """The method's own rule: the mean, no DP."""
        return self.reduction == "mean" and self.dp is None


@dataclasses.dataclass(frozen=True)
class ServerOptimizer:
    """The server optimizer of a method's global part (`method_options.<method>.server_opt`, the
    same option on every method with a global part; `aggregation.server_opt`, Reddi et al.,
    ICLR 2021): an optax transformation applied to the pseudo-gradient `θ − mean_i θ_i`.

    kind: `none` (the aggregate as is, FedAvg), `sgd` (`optax.sgd(lr, momentum)`: FedAvgM),
      `adam`, `yogi` (`optax.adam`/`optax.yogi(lr, b1, b2, eps)`: FedAdam, FedYogi) or `adagrad`
      (`optax.adagrad(lr)` with `v_{-1} = eps²`: FedAdagrad).
    lr: the server learning rate `η`; None: the kind's default (`sgd` 1, `adam`/`yogi` 1e-2,
      `adagrad` 1e-1).
    momentum (`sgd`; 0: plain server SGD, SCAFFOLD's `η_g`), b1, b2, eps (`τ`): as optax's.
    """

    kind: Literal["none", "sgd", "adam", "yogi", "adagrad"] = "none"
    lr: float | None = None
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-3

    def __post_init__(self):
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"server_opt.kind must be one of {SERVER_OPTIMIZERS}, got {self.kind!r}"
            )
        if self.lr is not None and not self.lr > 0:
            raise ValueError(
                f"server_opt.lr must be positive (or null: the default), got {self.lr}"
            )
        for name in ("momentum", "b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"server_opt.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"server_opt.eps must be positive, got {self.eps}")
