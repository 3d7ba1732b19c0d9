"""CoMiGS routing analysis and the Llama path's CV² balancing loss, against NumPy: per-client,
per-layer generalist shares and the most generalist/specialist-routed tokens computed by loops from
the sown gate weights, the routing plot, the llama-moe balance loss (count and smooth noisy load,
the generalist factors, the block's layer weighting), and CoMiGS-1GXS (per-client expert counts)
run from a YAML config through the CLI."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from fedjax_lora import lora
from fedjax_lora.aggregation.masks import path_names
from fedjax_lora.algorithms import Problem
from fedjax_lora.algorithms.comigs import CoMiGSOptions, comigs, with_moe
from fedjax_lora.cli import main
from fedjax_lora.data.streams import eval_windows, stack_streams
from fedjax_lora.engine import LocalTraining, OptimizerConfig
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.factory import from_config
from fedjax_lora.moe import (
    ROUTING_WEIGHTS,
    MoEConfig,
    cv2_balancing_loss,
    install_moe,
    plot_routing_shares,
    routing_analysis,
)
from tests.test_cli import TINY
from tests.tiny import SEQ, client_streams

TWO_LAYERS = ModelConfig(
    family="gpt2", vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_positions=32
)
COUNTS = (3, 2, 1)
MOE = MoEConfig(num_experts=3, top_k=2, rank=2)


# ---------------------------------------------------------------- NumPy references


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_top_k_weights(z, k):
    """Softmax over the k largest of one token's logits, zero elsewhere (k ≥ 2)."""
    w = np.zeros(len(z))
    top = np.argsort(-z, kind="stable")[:k]
    w[top] = np_softmax(z[top])
    return w


def np_phi(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def np_cv_squared(x):
    """llama-moe's `cv_squared`: torch's unbiased variance over mean² + 1e-10; 0 for one value."""
    if len(x) == 1:
        return 0.0
    return float(np.var(x, ddof=1) / (np.mean(x) ** 2 + 1e-10))


def np_cv2_loss(noisy, clean, k, num_real, pi=None, noise_std=0.0, quirk=False):
    """`TopKBalancedNoisyGate.forward`'s balance loss (llama-moe, the CoMiGS icml code) over the
    first `num_real` experts, token by token."""
    noisy, clean = noisy[:, :num_real], clean[:, :num_real]
    tokens, e = noisy.shape
    importance, load = np.zeros(e), np.zeros(e)
    for t in range(tokens):
        weights = np_top_k_weights(noisy[t], min(k, e))
        importance += weights
        if noise_std > 0 and k < e:
            top = np.sort(noisy[t])[::-1][: k + 1]
            for j in range(e):
                test = noisy[t, j] - clean[t, j] if quirk else noisy[t, j]
                threshold = top[k] if test > top[k] else top[k - 1]
                load[j] += np_phi((clean[t, j] - threshold) / noise_std)
        else:
            load += weights > 0
    factors = np.ones(e)
    if pi is not None:
        factors[1:] *= (e - 1) / (1 - pi)
        factors[0] /= pi
        factors /= e
    return np_cv_squared(importance * factors) + np_cv_squared(load * factors)


# ---------------------------------------------------------------- CV² balancing


@pytest.mark.parametrize(
    "e_max,num_real,k,pi,noise,quirk",
    [
        (4, 4, 2, None, 0.0, False),  # count load
        (5, 3, 2, 0.5, 0.0, False),  # padded client, generalist factors
        (4, 4, 2, None, 0.7, False),  # smooth load under gate noise (Shazeer et al.)
        (5, 3, 2, None, 0.7, True),  # llama-moe's membership test on the noise alone
        (2, 2, 2, None, 0.7, False),  # k = E: the load is a constant count
    ],
)
def test_cv2_balancing_matches_llama_moe(e_max, num_real, k, pi, noise, quirk):
    rng = np.random.default_rng(e_max * 10 + num_real)
    clean = rng.normal(size=(24, e_max))
    noisy = clean + noise * rng.normal(size=clean.shape)
    mask = np.arange(e_max) < num_real
    weights = np.stack(
        [np.r_[np_top_k_weights(z[:num_real], k), np.zeros(e_max - num_real)] for z in noisy]
    )
    masked = lambda x: jnp.asarray(np.where(mask, x, -np.inf), jnp.float32)

    @jax.jit
    @jax.value_and_grad
    def loss(noisy, clean):
        return cv2_balancing_loss(
            jnp.asarray(weights, jnp.float32),
            noisy,
            jnp.asarray(mask),
            k,
            pi,
            clean=clean,
            noise_std=noise,
            noise_quirk=quirk,
        )

    got, grad = loss(masked(noisy), masked(clean))
    np.testing.assert_allclose(
        got, np_cv2_loss(noisy, clean, k, num_real, pi, noise, quirk), rtol=1e-4, atol=1e-7
    )
    assert np.all(np.isfinite(grad))  # padded experts' -inf logits give no NaN gradient
    # With a token mask (an example row's padding 0): llama-moe's loss on the real tokens alone.
    tokens = np.arange(len(clean)) % 3 > 0
    got = cv2_balancing_loss(
        jnp.asarray(weights, jnp.float32),
        masked(noisy),
        jnp.asarray(mask),
        k,
        pi,
        clean=masked(clean),
        noise_std=noise,
        noise_quirk=quirk,
        tokens=jnp.asarray(tokens, jnp.float32),
    )
    want = np_cv2_loss(noisy[tokens], clean[tokens], k, num_real, pi, noise, quirk)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_cv2_block_loss_is_summed_over_layers():
    """The block sows `λ · L_CV` (the Llama reference sums over layers), not `λ / L · L_CV`."""
    model = from_config(TWO_LAYERS, seed=0)
    lora.add_lora(model, lora.LoRAConfig(targets=("c_attn",), rank=2))
    config = MoEConfig(num_experts=3, top_k=2, rank=2, balance_loss="cv2", generalist_share=None)
    install_moe(model, config, key=jax.random.key(0))
    block = model.transformer.h[0].mlp
    block.router.w[...] = 3.0 * block.router.w[...] / 0.02  # routing away from uniform
    h = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 16)), jnp.float32)
    graphdef, state = nnx.split(block)
    run = lambda st, x: nnx.capture(lambda b, x: b(x), nnx.Intermediate)(nnx.merge(graphdef, st), x)
    _, sown = jax.jit(run)(state, h)
    sown = {path[-1]: jax.tree.leaves(v)[0] for path, v in nnx.to_flat_state(sown)}
    logits = np.asarray(h, np.float64).reshape(-1, 16) @ np.asarray(block.router.w[...], np.float64)
    want = config.lb_coef * np_cv2_loss(logits, logits, 2, 3)
    np.testing.assert_allclose(sown["aux_loss"], want, rtol=1e-4)


# ---------------------------------------------------------------- routing analysis


@pytest.fixture(scope="module")
def routed():
    """A 2-layer CoMiGS state (clients with 3, 2, 1 experts) with sharpened routers, its MoE
    problem, and the routing analysis of its validation windows."""
    streams = client_streams(len(COUNTS))
    model = from_config(TWO_LAYERS, seed=0)
    lora.add_lora(model, lora.LoRAConfig(targets=("c_attn",), rank=2))
    problem = Problem.create(
        model,
        stack_streams(streams),
        {"val": eval_windows(stack_streams([s[::-1].copy() for s in streams]), SEQ, 5)},
        training=LocalTraining(steps=1, batch_size=2, seq_len=SEQ),
        optimizer=OptimizerConfig(lr=1e-2),
        eval_batch_size=4,
    )
    algo = comigs(problem, CoMiGSOptions(moe=MOE, expert_counts=COUNTS, router_batches="windows"))
    sim = algo.init(jax.random.key(0))
    sharpen = lambda path, x: x * 100.0 if "router" in path_names(path) else x
    params = jax.tree_util.tree_map_with_path(sharpen, sim.clients.params)
    params = nnx.merge_state(params, sim.clients.frozen)  # with the clients' expert masks
    moe_problem = with_moe(problem, MOE)
    decode = type("Tokenizer", (), {"decode": staticmethod(lambda ids: f"<{ids[0]}>")})()
    result = routing_analysis(
        moe_problem.graphdef,
        params,
        moe_problem.base,
        moe_problem.eval_sets["val"],
        top_k=3,
        min_count=2,
        tokenizer=decode,
    )
    return moe_problem, params, result


def gate_weights(moe_problem):
    """`(client params, window [T]) -> [L, T, E]`: the sown mixture weights of a plain forward
    pass, blocks in model order."""

    @jax.jit
    def forward(params, window):
        model = nnx.merge(moe_problem.graphdef, params, moe_problem.base)
        _, sown = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(model, window[None])
        flat = nnx.to_flat_state(sown)
        blocks = {p[2]: jax.tree.leaves(v)[0][0] for p, v in flat if ROUTING_WEIGHTS in p}
        return jnp.stack([blocks[layer] for layer in sorted(blocks)])

    return lambda params, window: np.asarray(forward(params, jnp.asarray(window)), np.float64)


def test_generalist_shares_and_tokens_match_numpy(routed):
    moe_problem, params, result = routed
    windows = np.asarray(moe_problem.eval_sets["val"].windows)
    valid = np.asarray(moe_problem.eval_sets["val"].weights) > 0
    assert result.layers == ("transformer.h.0.mlp", "transformer.h.1.mlp")
    assert result.shares.shape == (len(COUNTS), 2)
    assert np.all((result.shares >= 0) & (result.shares <= 1))
    forward = gate_weights(moe_problem)
    for i, count in enumerate(COUNTS):
        client = jax.tree.map(lambda x, i=i: x[i], params)
        sums = [dict(), dict()]  # per layer: token -> [share sum, count]
        totals = np.zeros(2)
        n = 0
        for w in range(windows.shape[1]):
            gates = forward(client, windows[i, w, :-1])
            for t in range(windows.shape[2] - 1):
                if not valid[i, w, t]:
                    continue
                n += 1
                for layer, g in enumerate(gates):
                    assert np.all(g[t, count:] == 0)  # absent experts get no weight
                    share = g[t, 0] / g[t].sum()
                    totals[layer] += share
                    entry = sums[layer].setdefault(int(windows[i, w, t]), [0.0, 0])
                    entry[0] += share
                    entry[1] += 1
        np.testing.assert_allclose(result.shares[i], totals / n, rtol=1e-5)
        if count == 1:
            np.testing.assert_array_equal(result.shares[i], 1.0)
        for layer in range(2):
            means = {v: (s / c, c) for v, (s, c) in sums[layer].items() if c >= 2}
            ranked = sorted(means, key=lambda v: (-means[v][0], v))
            for got, want in ((result.generalist, ranked[:3]), (result.specialist, None)):
                want = want or sorted(means, key=lambda v: (means[v][0], v))[:3]
                entries = got[i][layer]
                assert [e.token for e in entries] == [f"<{v}>" for v in want]
                np.testing.assert_allclose(
                    [e.share for e in entries], [means[v][0] for v in want], rtol=1e-5
                )
                assert [e.count for e in entries] == [means[v][1] for v in want]
    assert result.shares[0].min() < 0.9  # the sharpened routers do route to specialists


def test_plot_routing_shares(routed, tmp_path):
    _, _, result = routed
    path = tmp_path / "routing.png"
    plot_routing_shares(result.shares, ["a", "b", "c"], path, layers=result.layers)
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="3 client rows"):
        plot_routing_shares(result.shares[:2], ["a", "b", "c"], path)


# ---------------------------------------------------------------- CoMiGS-1GXS from the CLI


def test_comigs_with_per_client_expert_counts_runs_from_yaml(tmp_path):
    config = {
        "methods": ["comigs"],
        "rounds": 1,
        "data": {"num_groups": 2, "clients_per_group": 1},
        "method_options": {
            "comigs": {
                "expert_counts": [1, 3],
                "moe": {"num_experts": 3, "top_k": 2, "rank": 2},
                "schedule": {"router_every": 1, "router_steps": 1},
            }
        },
    }
    path = tmp_path / "comigs.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["run", str(path), "--out", str(tmp_path / "run"), "--no-progress", "--set", *TINY]
    argv += ["training.steps=1"]
    assert main(argv) == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert len(records[-1]["val_ppl"]) == 2 and np.all(np.isfinite(records[-1]["val_ppl"]))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method_options"]["comigs"]["expert_counts"] == [1, 3]
    # More experts than slots fails with the option named.
    path.write_text(
        yaml.safe_dump({**config, "method_options": {"comigs": {"expert_counts": [5] * 2}}})
    )
    assert main(argv) == 2
