"""The global rule (client-level DP, robust reductions) on HetLoRA's and FlexLoRA's servers against
NumPy loop references on a tiny ranked tree: FlexLoRA's rule over the products `ΔW_i = s_i A_i B_i`
(DP: each client's whole update from the factors it started from clipped to C, the uniform mean,
noise `z·C/n` on the full matrix before the SVD; the median over the `ΔW_i`; Krum over the
flattened uploads), HetLoRA's over the truncated factors (DP likewise; the median and trimmed mean
of each rank over the clients holding it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lora import aggregation as agg

RANKS = (2, 4, 3, 4)
N, R_MAX = len(RANKS), max(RANKS)
ACTIVE = np.arange(R_MAX)[None] < np.asarray(RANKS)[:, None]
SCALE = np.where(ACTIVE, 16.0 / np.sqrt(RANKS)[:, None], 0.0)


def tree(seed: int, d_in: int = 6, d_out: int = 5) -> dict:
    """A stacked tree (f64 NumPy): one ranked module `mlp` (padded ranks zero, scales
    `16/√r_i`) and a fixed-rank attention LoRA `attn`."""
    rng = np.random.default_rng(seed)
    return {
        "attn": {"lora": {"a": rng.normal(size=(N, 3, 2)), "b": rng.normal(size=(N, 2, 3))}},
        "mlp": {
            "lora": {
                "a": rng.normal(size=(N, d_in, R_MAX)) * ACTIVE[:, None, :],
                "b": rng.normal(size=(N, R_MAX, d_out)) * ACTIVE[:, :, None],
                "rank_scale": SCALE.copy(),
            }
        },
    }


def as_jax(x):
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), x)


def products(t: dict) -> np.ndarray:
    """`ΔW_i = Σ_k s_ik a_i[:, k] b_i[k, :]` by a loop over clients and ranks."""
    m = t["mlp"]["lora"]
    out = np.zeros((N, m["a"].shape[1], m["b"].shape[2]))
    for i in range(N):
        for k in range(RANKS[i]):
            out[i] += m["rank_scale"][i, k] * np.outer(m["a"][i, :, k], m["b"][i, k])
    return out


def attention(t: dict) -> list[np.ndarray]:
    return [t["attn"]["lora"]["a"], t["attn"]["lora"]["b"]]


def clipped_mean(uploads, starts, c):
    """NumPy DP-FedAvg without noise: each client's update over all its arrays clipped to `c`
    (the norms checked), the uniform mean of `start_i + clipped update_i`; also the norms."""
    norms = [
        np.sqrt(sum(np.sum((u[i] - s[i]) ** 2) for u, s in zip(uploads, starts, strict=True)))
        for i in range(N)
    ]
    scale = [min(1.0, c / x) for x in norms]
    out = []
    for u, s in zip(uploads, starts, strict=True):
        clipped = [s[i] + scale[i] * (u[i] - s[i]) for i in range(N)]
        out.append(np.mean(clipped, 0))
    for i in range(N):
        size = np.sqrt(
            sum(
                np.sum((scale[i] * (u[i] - s[i])) ** 2)
                for u, s in zip(uploads, starts, strict=True)
            )
        )
        assert size <= c * (1 + 1e-12)
    return out, norms


def check_flexlora(out, delta):
    """Every client holds the rank-`r_i` truncated SVD of `delta` (`s_i A_i B_i`, NumPy SVD)."""
    u, sv, vt = np.linalg.svd(delta, full_matrices=False)
    m = out["mlp"]["lora"]
    for i, r in enumerate(RANKS):
        got = SCALE[i, 0] * np.asarray(m["a"][i], np.float64) @ np.asarray(m["b"][i], np.float64)
        want = u[:, :r] @ np.diag(sv[:r]) @ vt[:r]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def run(aggregator, trained, start, *, key=None):
    """One apply from a state whose round start is `start`."""
    state = aggregator.init(as_jax(start))
    if key is not None:
        state = state._replace(rule=state.rule._replace(key=key))
    weights = {"weights": jnp.asarray([100.0, 300.0, 50.0, 250.0])}  # dropped under every rule
    return jax.jit(aggregator.apply)(as_jax(trained), state, weights)


# ---------------------------------------------------------------- FlexLoRA


def test_flexlora_dp_without_noise_is_clip_then_mean_then_svd():
    trained, start, c = tree(1), tree(2), 3.0
    dp = agg.dp_aggregator(clip_norm=c, noise_multiplier=0.0)
    out, state = run(agg.flexlora_aggregator(rule=dp), trained, start)
    uploads = [products(trained), *attention(trained)]
    (delta, *attn), norms = clipped_mean(uploads, [products(start), *attention(start)], c)
    assert min(norms) > c  # the clipping bites on every client
    check_flexlora(out, delta)
    for got, want in zip(attention(out), attn, strict=True):
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-5, atol=1e-6)
    # the next round starts from this output
    np.testing.assert_array_equal(state.start["mlp"]["lora"]["a"], out["mlp"]["lora"]["a"])


def test_flexlora_dp_noise_on_the_full_matrix_has_std_z_c_over_n():
    """`d_in = 4, d_out = 3 ≤ r_max`: the full-rank client's product is the noisy `ΔW` itself, so
    its difference from the noiseless one is the noise, over 1,500 keys."""
    trained, start, c, z = tree(3, 4, 3), tree(4, 4, 3), 2.0, 1.3
    exact, _ = run(
        agg.flexlora_aggregator(rule=agg.dp_aggregator(clip_norm=c, noise_multiplier=0.0)),
        trained,
        start,
    )
    noisy = agg.flexlora_aggregator(rule=agg.dp_aggregator(clip_norm=c, noise_multiplier=z))
    keys = jax.vmap(lambda k: jax.random.key_data(jax.random.key(k)))(jnp.arange(1500))
    state = noisy.init(as_jax(start))
    draw = lambda k: noisy.apply(as_jax(trained), state._replace(rule=state.rule._replace(key=k)))[
        0
    ]
    outs = jax.jit(jax.vmap(draw))(keys)
    product = lambda m: (
        SCALE[1, 0]
        * np.einsum(
            "...ir,...ro->...io",
            np.asarray(m["a"][..., 1, :, :], np.float64),
            np.asarray(m["b"][..., 1, :, :], np.float64),
        )
    )
    noise = product(outs["mlp"]["lora"]) - product(exact["mlp"]["lora"])[None]
    assert noise.shape == (1500, 4, 3)
    np.testing.assert_allclose(noise.std(), z * c / N, rtol=0.03)
    assert abs(noise.mean()) < 0.05 * z * c / N
    attn = np.asarray(outs["attn"]["lora"]["a"][:, 0]) - np.asarray(exact["attn"]["lora"]["a"][0])
    np.testing.assert_allclose(attn.std(), z * c / N, rtol=0.05)


def test_flexlora_median_is_the_median_of_the_products_then_svd():
    trained = tree(5)
    out, _ = run(agg.flexlora_aggregator(rule=agg.median_aggregator()), trained, tree(6))
    check_flexlora(out, np.median(products(trained), 0))
    for got, x in zip(attention(out), attention(trained), strict=True):
        np.testing.assert_allclose(got, np.broadcast_to(np.median(x, 0), got.shape), atol=1e-6)


def test_flexlora_krum_selects_by_distances_over_the_whole_uploads():
    trained = tree(7)
    flat = np.concatenate([x.reshape(N, -1) for x in (products(trained), *attention(trained))], 1)
    d2 = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    f = 0  # N = 4 > 2f + 2
    scores = [np.sort(np.delete(d2[i], i))[: N - f - 2].sum() for i in range(N)]
    best = int(np.argmin(scores))
    out, _ = run(agg.flexlora_aggregator(rule=agg.krum_aggregator(f, 1)), trained, tree(8))
    check_flexlora(out, products(trained)[best])


# ---------------------------------------------------------------- HetLoRA


def factors(t: dict) -> list[np.ndarray]:
    return [t["mlp"]["lora"]["a"], t["mlp"]["lora"]["b"], *attention(t)]


def check_hetlora(out, a_g, b_g, attn):
    """Every client holds `(a_g, b_g)` truncated to its rank; attention leaves `attn`."""
    m = out["mlp"]["lora"]
    np.testing.assert_allclose(m["a"], a_g[None] * ACTIVE[:, None, :], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["b"], b_g[None] * ACTIVE[:, :, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(m["rank_scale"], SCALE.astype(np.float32))
    for got, want in zip(attention(out), attn, strict=True):
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-5, atol=1e-6)


def test_hetlora_dp_without_noise_is_the_clipped_mean_of_the_factors():
    """Round 1 (the server's factors are zero: nobody prunes)."""
    trained, start, c = tree(11), tree(12), 2.5
    dp = agg.dp_aggregator(clip_norm=c, noise_multiplier=0.0)
    out, state = run(agg.hetlora_aggregator(rule=dp), trained, start)
    (a_g, b_g, *attn), norms = clipped_mean(factors(trained), factors(start), c)
    assert min(norms) > c
    check_hetlora(out, a_g, b_g, attn)
    np.testing.assert_allclose(state.own.server["mlp.lora"][0], a_g, rtol=1e-5, atol=1e-6)


def test_hetlora_dp_noise_has_std_z_c_over_n():
    trained, start, c, z = tree(13), tree(14), 1.5, 0.8
    aggregator = agg.hetlora_aggregator(rule=agg.dp_aggregator(clip_norm=c, noise_multiplier=z))
    state = aggregator.init(as_jax(start))
    keys = jax.vmap(lambda k: jax.random.key_data(jax.random.key(k)))(jnp.arange(1500))
    draw = lambda k: aggregator.apply(
        as_jax(trained), state._replace(rule=state.rule._replace(key=k))
    )[1]
    servers = jax.jit(jax.vmap(draw))(keys).own.server["mlp.lora"]
    (a_g, b_g, *_), _ = clipped_mean(factors(trained), factors(start), c)
    for got, want in zip(servers, (a_g, b_g), strict=True):
        noise = np.asarray(got, np.float64) - want[None]
        np.testing.assert_allclose(noise.std(), z * c / N, rtol=0.03)


def np_held(x: np.ndarray, present: np.ndarray, reduce) -> np.ndarray:
    """Per coordinate, `reduce` over the clients holding it (0 where nobody does), a loop."""
    out = np.zeros(x.shape[1:])
    for idx in np.ndindex(*x.shape[1:]):
        values = [x[(i, *idx)] for i in range(N) if present[(i, *idx)]]
        out[idx] = reduce(np.asarray(values)) if values else 0.0
    return out


def np_trimmed(values: np.ndarray, beta: float) -> float:
    b = int(beta * len(values))
    return float(np.mean(np.sort(values)[b : len(values) - b]))


@pytest.mark.parametrize("reduction", ["median", "trimmed_mean"])
def test_hetlora_robust_rule_reduces_each_rank_over_its_holders(reduction):
    trained, beta = tree(15), 0.34  # ⌊0.34 h⌋: 1 of 3 or 4 holders, 0 of 2
    if reduction == "median":
        rule, reduce = agg.median_aggregator(), np.median
    else:
        rule, reduce = agg.trimmed_mean_aggregator(beta), lambda v: np_trimmed(v, beta)
    out, _ = run(agg.hetlora_aggregator(rule=rule), trained, tree(16))
    a, b, *attn = factors(trained)
    a_g = np_held(a, np.broadcast_to(ACTIVE[:, None, :], a.shape), reduce)
    b_g = np_held(b, np.broadcast_to(ACTIVE[:, :, None], b.shape), reduce)
    assert np.all(a_g[:, 1] != 0)  # rank 1 is held by 3 of 4 clients: not pulled to 0
    attn = [np_held(x, np.ones_like(x, bool), reduce) for x in attn]
    check_hetlora(out, a_g, b_g, attn)


def test_ranked_servers_refuse_the_reference_weights_with_a_rule():
    with pytest.raises(ValueError, match="reference_accumulator"):
        agg.flexlora_aggregator(16.0, True, rule=agg.median_aggregator())
    with pytest.raises(ValueError, match="reference_weights"):
        agg.hetlora_aggregator(reference_weights=True, rule=agg.median_aggregator())
