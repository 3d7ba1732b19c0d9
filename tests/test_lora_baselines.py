"""The federated LoRA baselines of CoMiGS (FFA-LoRA, FedSA-LoRA, HetLoRA, FlexLoRA) against NumPy
loop references: the servers' aggregation, HetLoRA's regulariser and self-pruning, rank masks
keeping padded ranks at zero, one tiny round of every method through the registry, and method
options (per-client ranks) from the config."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lora import aggregation as agg
from fedjax_lora import config as config_lib
from fedjax_lora.aggregation.masks import masked_aggregator, path_names
from fedjax_lora.aggregation.testing import check_aggregator
from fedjax_lora.algorithms import get_method
from fedjax_lora.algorithms.lora_baselines import FlexLoRAOptions, RankedLoRA, ffa_frozen
from fedjax_lora.cli import main
from fedjax_lora.experiment import method_factory
from fedjax_lora.export import client_model_state
from fedjax_lora.lora import LoRAConfig
from tests.test_cli import TINY
from tests.tiny import tiny_problem

RANKS = (2, 4, 3, 4)
N, D_IN, D_OUT, R_MAX = len(RANKS), 6, 5, max(RANKS)


def ranked_tree(seed=0, tails=(1.0,) * N):
    """A stacked tree with one ranked module (`mlp`, padded ranks zero, client i's last active
    rank scaled by `tails[i]`) and a fixed-rank attention LoRA."""
    rng = np.random.default_rng(seed)
    active = np.arange(R_MAX)[None] < np.asarray(RANKS)[:, None]
    scale = np.where(active, 16.0 / np.sqrt(RANKS)[:, None], 0.0).astype(np.float32)
    a = rng.normal(size=(N, D_IN, R_MAX)) * active[:, None, :]
    b = rng.normal(size=(N, R_MAX, D_OUT)) * active[:, :, None]
    for i, t in enumerate(tails):
        a[i, :, RANKS[i] - 1] *= t
    return {
        "attn": {"lora": {"a": rng.normal(size=(N, D_IN, 2)), "b": rng.normal(size=(N, 2, D_IN))}},
        "mlp": {"lora": {"a": a, "b": b, "rank_scale": scale}},
    }


def as_jax(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def fro(x):
    return float(np.sqrt(np.sum(np.square(x))))


def np_delta(a, b, scale):
    """`Σ_k scale_k a[:, k] b[k, :]` by an explicit loop over ranks."""
    out = np.zeros((a.shape[0], b.shape[1]))
    for k in range(len(scale)):
        out += scale[k] * np.outer(a[:, k], b[k])
    return out


def np_uniform_mean(x):
    return np.stack([np.mean(x, 0)] * len(x))


# ---------------------------------------------------------------- HetLoRA


def np_hetlora(tree, server, keep, reference_weights):
    """The reference's `HetLoraAggregationStrategy` and `synchronize`, client by client."""
    m = tree["mlp"]["lora"]
    a, b, s = (np.array(m[k], np.float64) for k in ("a", "b", "rank_scale"))
    sa, sb = server
    pruned = []
    for i in range(N):
        r = int(np.sum(s[i] > 0))
        k = max(math.floor(keep * r), 1)
        own = fro(a[i][:, k:r]) * fro(b[i][k:r])
        last = fro(sa[:, k:r]) * fro(sb[k:r])
        pruned.append(own < last)
        if own < last:
            a[i][:, k:], b[i][k:], s[i][k:] = 0.0, 0.0, 0.0
    if reference_weights:
        wa = np.array([fro(a[i]) for i in range(N)])
        wb = np.array([fro(b[i]) for i in range(N)])
    else:
        wa = wb = np.array([fro(np_delta(a[i], b[i], s[i])) for i in range(N)])
    wa, wb = wa / wa.sum(), wb / wb.sum()
    ga = sum(wa[i] * a[i] for i in range(N))
    gb = sum(wb[i] * b[i] for i in range(N))
    new_a, new_b = np.zeros_like(a), np.zeros_like(b)
    for i in range(N):
        r = int(np.sum(s[i] > 0))
        new_a[i][:, :r], new_b[i][:r] = ga[:, :r], gb[:r]
    return new_a, new_b, s, (ga, gb), pruned


@pytest.mark.parametrize("reference_weights", [False, True])
def test_hetlora_aggregation_matches_numpy(reference_weights):
    keep = 0.75  # exact in f32: tails are ranks 1 (r=2), 2 (r=3), 3 (r=4)
    tree = ranked_tree(seed=1, tails=(0.01, 3.0, 0.01, 3.0))
    rng = np.random.default_rng(2)
    server = (rng.normal(size=(D_IN, R_MAX)), rng.normal(size=(R_MAX, D_OUT)))
    want_a, want_b, want_s, want_server, pruned = np_hetlora(tree, server, keep, reference_weights)
    assert any(pruned) and not all(pruned), pruned  # the case exercises both branches
    aggregator = agg.hetlora_aggregator(keep, reference_weights=reference_weights)
    state = agg.HetLoRAState({"mlp.lora": tuple(jnp.asarray(x, jnp.float32) for x in server)})
    out, new_state = jax.jit(aggregator.apply)(as_jax(tree), state)
    got = out["mlp"]["lora"]
    np.testing.assert_allclose(got["a"], want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["b"], want_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["rank_scale"], want_s.astype(np.float32))
    for g, w in zip(new_state.server["mlp.lora"], want_server, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    for name in ("a", "b"):
        want = np_uniform_mean(np.asarray(tree["attn"]["lora"][name], np.float64))
        np.testing.assert_allclose(out["attn"]["lora"][name], want, rtol=1e-5, atol=1e-6)


def test_hetlora_first_round_never_prunes_and_keeps_the_battery_properties():
    """`init` holds the server's `B = 0` init: no tail product is below 0, nobody prunes."""
    tree = as_jax(ranked_tree(seed=3, tails=(1e-3,) * N))
    aggregator = agg.hetlora_aggregator()
    out, _ = aggregator.apply(tree, aggregator.init(tree))
    np.testing.assert_array_equal(
        out["mlp"]["lora"]["rank_scale"], tree["mlp"]["lora"]["rank_scale"]
    )
    check_aggregator(agg.hetlora_aggregator, tree=tree, name="hetlora")


def test_hetlora_regulariser_and_rank_mask_match_numpy():
    """The module's output is `s · x A[:, :r] B[:r]`, it sows `λ ‖A_tail‖ ‖B_tail‖`, padded ranks
    get exactly zero gradient, and the regulariser's gradient is finite at `B = 0`."""
    config = LoRAConfig(targets=("x",), rank=R_MAX, alpha=16.0, scaling="alpha/sqrt(r)")
    module = RankedLoRA(D_IN, D_OUT, config, prune_coef=0.1, keep=0.5)
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(D_IN, R_MAX)), rng.normal(size=(R_MAX, D_OUT))
    s = 16.0 / math.sqrt(3)
    module.a[...], module.b[...] = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    module.rank_scale[...] = jnp.asarray([s, s, s, 0.0])  # rank 3 of 4
    x = rng.normal(size=(2, 3, D_IN))
    graphdef, state = nnx.split(module)

    def run(state):
        model = nnx.merge(graphdef, state)
        y, sown = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(
            model, jnp.asarray(x, jnp.float32)
        )
        return y, sum(jnp.sum(v) for v in jax.tree.leaves(sown))

    y, reg = jax.jit(run)(state)
    np.testing.assert_allclose(y, s * x @ a[:, :3] @ b[:3], rtol=1e-5, atol=1e-5)
    # r = 3, keep 0.5: ranks max(floor(1.5), 1) = 1 .. 2 are the tail
    np.testing.assert_allclose(reg, 0.1 * fro(a[:, 1:3]) * fro(b[1:3]), rtol=1e-5)
    grad = jax.jit(jax.grad(lambda st: jnp.sum(run(st)[0]) + run(st)[1]))
    grads = {path[-1]: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grad(state))}
    np.testing.assert_array_equal(grads["a"][:, 3], 0.0)
    np.testing.assert_array_equal(grads["b"][3], 0.0)
    assert np.any(grads["a"][:, :3]) and np.any(grads["b"][:3])
    # Round start: B = 0, where the norm has its kink; the gradient stays finite.
    zero_b = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if path_names(path)[-1] == "b" else v, state
    )
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad(zero_b)))


# ---------------------------------------------------------------- FlexLoRA


@pytest.mark.parametrize("merge_alpha", [None, 16.0])
def test_flexlora_aggregation_matches_numpy(merge_alpha):
    tree = ranked_tree(seed=5)
    tokens = np.array([100.0, 300.0, 50.0, 250.0])
    out, _ = jax.jit(agg.flexlora_aggregator(merge_alpha).apply)(
        as_jax(tree), (), {"weights": jnp.asarray(tokens)}
    )
    m = tree["mlp"]["lora"]
    s_i = [16.0 / math.sqrt(r) for r in RANKS]
    p = tokens / tokens.sum()
    delta = np.zeros((D_IN, D_OUT))
    for i, r in enumerate(RANKS):
        rate = s_i[i] if merge_alpha is None else merge_alpha / r
        delta += p[i] * rate * np.asarray(m["a"][i][:, :r], np.float64) @ m["b"][i][:r]
    u, sv, vt = np.linalg.svd(delta, full_matrices=False)
    got = out["mlp"]["lora"]
    for i, r in enumerate(RANKS):
        a_i, b_i = np.asarray(got["a"][i], np.float64), np.asarray(got["b"][i], np.float64)
        best = u[:, :r] @ np.diag(sv[:r]) @ vt[:r]  # the rank-r_i truncated SVD
        want = best if merge_alpha is None else best * s_i[i] / (merge_alpha / R_MAX)
        np.testing.assert_allclose(s_i[i] * a_i @ b_i, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a_i[:, :r].T @ a_i[:, :r], np.eye(r), atol=1e-5)
        np.testing.assert_array_equal(a_i[:, r:], 0.0)
        np.testing.assert_array_equal(b_i[r:], 0.0)
    np.testing.assert_array_equal(got["rank_scale"], m["rank_scale"])
    for name in ("a", "b"):
        want = np_uniform_mean(np.asarray(tree["attn"]["lora"][name], np.float64))
        np.testing.assert_allclose(out["attn"]["lora"][name], want, rtol=1e-5, atol=1e-6)


def test_flexlora_keeps_the_battery_properties():
    check_aggregator(
        agg.flexlora_aggregator,
        tree=as_jax(ranked_tree(seed=6)),
        example_inputs=lambda rng, n: {"weights": rng.uniform(1, 10, n).astype(np.float32)},
        # a re-factorisation (SVD of the weighted ΔW), not a mix of the factors: the new A, B
        # need not lie within the clients' range
        properties={"permutation_equivariant"},
        rtol=1e-4,
        atol=1e-5,
        name="flexlora",
    )


# ---------------------------------------------------------------- FFA and FedSA servers


FFA_GLOBAL = lambda names: names[-1] != "a"  # FFA-LoRA's server: every leaf but the frozen A


@pytest.mark.parametrize("policy", [FFA_GLOBAL, "fedsa"], ids=["ffa", "fedsa"])
def test_ffa_and_fedsa_aggregation_match_numpy(policy):
    rng = np.random.default_rng(7)
    tree = {
        "attn": {"lora": {"a": rng.normal(size=(N, 4, 2)), "b": rng.normal(size=(N, 2, 4))}},
        "mlp": {"lora": {"a": rng.normal(size=(N, 4, 2)), "b": rng.normal(size=(N, 2, 3))}},
    }
    out, _ = jax.jit(masked_aggregator(policy).apply)(as_jax(tree), ())
    for module in ("attn", "mlp"):
        for name, x in tree[module]["lora"].items():
            shared = name == ("b" if policy is FFA_GLOBAL else "a")  # FedSA: A only
            want = np.zeros_like(x)
            for i in range(N):
                want[i] = sum(x[j] for j in range(N)) / N if shared else x[i]
            np.testing.assert_allclose(out[module]["lora"][name], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- one round of every method


@functools.cache
def problem():
    return tiny_problem(num_clients=3, steps=2, lr=2e-2)


def flat(params):
    return {
        ".".join(path_names(p)): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
    }


@functools.cache
def one_round(name, **options):
    algo = get_method(name)(problem(), **options)
    sim = algo.init(jax.random.key(0))
    start = flat(client_model_state(sim.clients))
    sim, metrics = algo.round(sim)
    assert np.all(np.isfinite(metrics["train"]["train_loss"])), name
    assert np.all(np.isfinite(metrics["val"]["loss"])), name
    return start, flat(client_model_state(sim.clients))  # adapters and frozen rank scales


def same_across_clients(x):
    return np.array_equal(x, np.broadcast_to(x[0], x.shape))


def test_ffa_lora_freezes_a_and_averages_b():
    start, end = one_round("ffa-lora")
    for name, value in end.items():
        if name.endswith(".a"):
            np.testing.assert_array_equal(value, start[name])  # frozen at the shared init
        else:
            assert not np.allclose(value, start[name]) and same_across_clients(value), name


def test_ffa_reference_variant_trains_only_the_attention_a():
    attention, mlp = ("h", "0", "attn", "c_attn", "lora_q"), ("h", "0", "mlp", "c_fc", "lora")
    assert ffa_frozen((*attention, "a")) and ffa_frozen((*mlp, "a"))
    assert not ffa_frozen((*attention, "a"), train_attention_a=True)
    assert ffa_frozen((*mlp, "a"), train_attention_a=True)
    assert not any(ffa_frozen((*path, "b"), flag) for path in (attention, mlp) for flag in (0, 1))


def test_fedsa_lora_shares_a_and_keeps_b_local():
    start, end = one_round("fedsa-lora")
    for name, value in end.items():
        assert same_across_clients(value) == name.endswith(".a"), name


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_ranked_methods_keep_padded_ranks_zero(name):
    ranks = (2, 4, 3)
    start, end = one_round(name, ranks=ranks, ranked=LoRAConfig(targets=("mlp.c_fc",), rank=4))
    active = np.arange(4)[None] < np.asarray(ranks)[:, None]
    scales = {k: v for k, v in end.items() if k.endswith("rank_scale")}
    assert scales, "no ranked module"
    for key, scale in scales.items():
        module = key[: -len("rank_scale")]
        if name == "flexlora":  # no pruning: s_i = 16 / r_i (alpha/r) on the first r_i ranks
            np.testing.assert_allclose(
                scale, np.where(active, 16.0 / np.asarray(ranks)[:, None], 0)
            )
        kept = scale > 0
        assert np.all(kept <= active)
        a, b = end[module + "a"], end[module + "b"]
        np.testing.assert_array_equal(np.where(kept[:, None, :], 0.0, a), 0.0)
        np.testing.assert_array_equal(np.where(kept[:, :, None], 0.0, b), 0.0)
        assert not np.allclose(b, start[module + "b"])  # trained and aggregated
    for key, value in end.items():  # the attention LoRA: uniform mean
        if "attn" in key:
            assert same_across_clients(value), key


# ---------------------------------------------------------------- method options


def test_unknown_method_option_fails_before_compute(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--no-progress", "--methods", "hetlora", "--set"]
    argv += [*TINY, "method_options.hetlora.rankz=[1,2]"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "method_options.hetlora has no option(s) ['rankz']" in err and "'ranks'" in err
    assert not (tmp_path / "metrics.jsonl").exists()
    argv[-1] = "method_options.hetlora.ranks=[1,2]"  # 12 clients
    assert main(argv) == 2
    assert "each of the 12 clients" in capsys.readouterr().err


def test_method_options_become_the_typed_options_dataclass():
    """Each key replaces a field of the method's defaults; a mapping for a dataclass field
    replaces that default's fields (`ranked`: the MLP LoRA's scaling stays)."""
    config = config_lib.load(
        None,
        [
            "methods=[flexlora, pcl-val]",
            "method_options.flexlora.ranks=[2,4]",
            "method_options.flexlora.ranked={targets: [mlp.c_fc], rank: 4, alpha: 8}",
        ],
    )
    factory = method_factory("flexlora", config)
    ranked = LoRAConfig(targets=("mlp.c_fc",), rank=4, alpha=8.0, scaling="alpha/sqrt(r)")
    assert factory.keywords == {"options": FlexLoRAOptions(ranks=(2, 4), ranked=ranked)}
    assert method_factory("pcl-val", config).keywords == {"options": config.trust}
    bad = config_lib.load(None, ["method_options.flexlora.ranked.scaling=alpha"])
    with pytest.raises(ValueError, match="method_options.flexlora.ranked.scaling"):
        method_factory("flexlora", bad)
