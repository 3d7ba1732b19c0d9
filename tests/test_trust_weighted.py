"""Trust-weighted aggregation at the algorithm level: cross-evaluation against one-by-one
evaluation and a NumPy forward pass, the warm-up schedule, row-stochastic recorded trust
matrices, masked peers, local optimizer states, and every method through the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lora.aggregation import fedavg_matrix, local_aggregator
from fedjax_lora.algorithms import federated
from fedjax_lora.algorithms.trust_weighted import TrustOptions, trust_weighted
from fedjax_lora.cli import main
from fedjax_lora.engine import Strategy
from fedjax_lora.engine.crosseval import attention_dropout_only, make_cross_eval
from fedjax_lora.engine.evaluate import make_client_eval
from fedjax_lora.engine.optim import OptimizerConfig
from tests.test_cli import TINY
from tests.tiny import SEQ, client_streams, tiny_problem

N = 4


@pytest.fixture(scope="module")
def problem():
    p = tiny_problem(N, steps=2)
    ref = np.stack([s[:SEQ] for s in client_streams(5, seed=7)]).astype(np.int32)  # [5, T]
    mixtures = np.array([[1, 0], [1, 0], [0.25, 0.75], [0, 1]], np.float32)
    return p.__class__(**{**vars(p), "side": {"reference": jnp.asarray(ref), "mixtures": mixtures}})


@pytest.fixture(scope="module")
def trained(problem):
    """Clients with distinct, non-trivial adapters: two local rounds from independent inits."""
    algo = federated("local", problem, local_aggregator(), shared_init=False)
    sim = algo.init(jax.random.key(0))
    for _ in range(2):
        sim, _ = algo.round(sim)
    return sim.clients.params


def _client(params, j):
    return jax.tree.map(lambda x: x[j], params)


def _numpy_logits(problem, params_j, tokens):
    """The tiny GPT-2 (1 block, LoRA on q and v) in NumPy, from the parameter arrays."""
    flat = {
        ".".join(map(str, k)): np.asarray(v, np.float64) for k, v in nnx.to_flat_state(problem.base)
    }
    ad = {".".join(map(str, k)): np.asarray(v, np.float64) for k, v in nnx.to_flat_state(params_j)}
    scale = 8.0 / 4  # alpha / rank of tests.tiny

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * flat[f"{p}.weight"] + flat[f"{p}.bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    t = tokens.shape[-1]
    x = flat["transformer.wte.weight"][tokens] + flat["transformer.wpe.weight"][np.arange(t)]
    h = ln(x, "transformer.h.0.ln_1")
    qkv = h @ flat["transformer.h.0.attn.c_attn.kernel"] + flat["transformer.h.0.attn.c_attn.bias"]
    d = x.shape[-1]
    for s, name in ((0, "q"), (2, "v")):
        pre = f"transformer.h.0.attn.c_attn.lora_{name}"
        qkv[..., s * d : (s + 1) * d] += scale * (h @ ad[f"{pre}.a"] @ ad[f"{pre}.b"])
    q, k, v = np.split(qkv, 3, axis=-1)
    heads = lambda z: z.reshape(t, 2, d // 2).transpose(1, 0, 2)
    q, k, v = heads(q), heads(k), heads(v)
    att = q @ k.transpose(0, 2, 1) / np.sqrt(d // 2)
    att = np.where(np.tril(np.ones((t, t), bool)), att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = (att @ v).transpose(1, 0, 2).reshape(t, d)
    x = (
        x
        + o @ flat["transformer.h.0.attn.c_proj.kernel"]
        + flat["transformer.h.0.attn.c_proj.bias"]
    )
    h = ln(x, "transformer.h.0.ln_2")
    m = gelu(h @ flat["transformer.h.0.mlp.c_fc.kernel"] + flat["transformer.h.0.mlp.c_fc.bias"])
    x = x + m @ flat["transformer.h.0.mlp.c_proj.kernel"] + flat["transformer.h.0.mlp.c_proj.bias"]
    return ln(x, "transformer.ln_f") @ flat["transformer.wte.weight"].T


@pytest.mark.parametrize("kind", ["map", "chunked"])
def test_cross_perplexity_equals_one_by_one_evaluation(problem, trained, kind):
    strategy = Strategy(kind, chunk_size=3)
    cross = make_cross_eval(problem.graphdef, problem.eval_batch_size, strategy)
    val = problem.eval_sets["val"]
    ppl = np.asarray(jax.jit(cross.perplexity)(trained, val, problem.base))
    one = jax.jit(make_client_eval(problem.graphdef, problem.eval_batch_size))
    for i in range(N):
        for j in range(N):
            s = one(_client(trained, j), val.windows[i], val.weights[i], problem.base)
            expected = np.exp(float(s["ce_sum"]) / float(s["tokens"]))
            np.testing.assert_allclose(ppl[i, j], expected, rtol=1e-5, err_msg=f"({i}, {j})")


def test_cross_perplexity_diagonal_matches_a_numpy_forward(problem, trained):
    cross = make_cross_eval(problem.graphdef, problem.eval_batch_size)
    val = problem.eval_sets["val"]
    ppl = np.asarray(jax.jit(cross.perplexity)(trained, val, problem.base))
    windows, weights = np.asarray(val.windows), np.asarray(val.weights)
    for i, j in ((0, 0), (1, 3), (3, 2)):
        ce, count = 0.0, 0.0
        for w in range(windows.shape[1]):
            if weights[j, w].sum() == 0:
                continue
            logits = _numpy_logits(problem, _client(trained, i), windows[j, w, :-1])
            logp = (
                logits
                - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None]
                - logits.max(-1, keepdims=True)
            )
            ce -= logp[np.arange(SEQ), windows[j, w, 1:]].sum()
            count += SEQ
        np.testing.assert_allclose(ppl[j, i], np.exp(ce / count), rtol=1e-4)


def test_reference_logits_are_each_models_last_position(problem, trained):
    cross = make_cross_eval(problem.graphdef, 2, Strategy("chunked", chunk_size=3))
    logits = np.asarray(
        jax.jit(cross.reference_logits)(trained, problem.side["reference"], problem.base)
    )
    ref = np.asarray(problem.side["reference"])
    assert logits.shape == (N, ref.shape[0], 64)
    for j in (0, 2):
        for s in (0, 4):
            expected = _numpy_logits(problem, _client(trained, j), ref[s])[-1]
            np.testing.assert_allclose(logits[j, s], expected, rtol=1e-4, atol=1e-4)


def test_eval_attention_dropout_quirk_is_random_only_in_attention(problem, trained):
    val = problem.eval_sets["val"]
    quirk = attention_dropout_only(problem.graphdef, problem.template, problem.base)
    cfgs = [
        v
        for _, m in nnx.iter_graph(nnx.merge(quirk, problem.template, problem.base))
        if isinstance(m, nnx.Module)
        for v in vars(m).values()
        if hasattr(v, "attn_dropout")
    ]
    assert cfgs and all(c.dropout == 0.0 for c in cfgs)
    ppl = lambda key, gd: np.asarray(
        jax.jit(make_cross_eval(gd, problem.eval_batch_size, dropout_key=key).perplexity)(
            trained, val, problem.base
        )
    )
    clean = ppl(None, problem.graphdef)
    # The tiny config has no attention dropout: the quirk graph is then exactly the clean model.
    np.testing.assert_allclose(ppl(jax.random.key(0), quirk), clean, rtol=1e-5)


def _run(problem, rule, rounds, options):
    algo = trust_weighted(problem, rule, options)
    sim = algo.init(jax.random.key(1))
    sims, history = [], []
    for _ in range(rounds):
        sim, m = algo.round(sim)
        sims.append(sim)
        history.append(jax.device_get(m))
    return sims, history


@pytest.fixture(scope="module")
def val_run(problem):
    return _run(problem, "validation", 3, TrustOptions(first_aggregation_round=2))


def test_schedule_warmup_then_row_stochastic_trust(val_run):
    _, history = val_run
    assert [bool(m["aggregation"]["applied"]) for m in history] == [False, True, True]
    np.testing.assert_array_equal(history[0]["aggregation"]["matrix"], np.eye(N))
    for m in history[1:]:
        w = m["aggregation"]["matrix"]
        assert np.all(w >= 0)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)


def test_validation_trust_is_softmax_of_one_by_one_perplexities(problem, val_run):
    """Round 2 of pcl-val (round 1 is warm-up) against a NumPy replay: the same clients trained
    locally for two rounds, each model evaluated on each client's data one by one,
    `W = softmax(-P)` row-wise and `θ_i = Σ_j W[i, j] θ_j`."""
    local_algo = federated("local", problem, local_aggregator(), shared_init=False)
    sim = local_algo.init(jax.random.key(1))
    for _ in range(2):
        sim, _ = local_algo.round(sim)
    pre = sim.clients.params
    val = problem.eval_sets["val"]
    one = jax.jit(make_client_eval(problem.graphdef, problem.eval_batch_size))
    ppl = np.zeros((N, N))
    for i in range(N):
        for j in range(N):
            s = one(_client(pre, j), val.windows[i], val.weights[i], problem.base)
            ppl[i, j] = np.exp(float(s["ce_sum"]) / float(s["tokens"]))
    w = np.exp(-(ppl - ppl.min(1, keepdims=True)))
    w /= w.sum(1, keepdims=True)
    got = val_run[1][1]["aggregation"]["matrix"]
    np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-6)
    mixed = [np.einsum("ij,j...->i...", w, np.asarray(x, np.float64)) for x in jax.tree.leaves(pre)]
    for a, b in zip(jax.tree.leaves(val_run[0][1].clients.params), mixed, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6)


def test_mixing_keeps_optimizer_state_and_schedule_local(problem):
    """pcl-fedavg vs local from the same init: identical optimizer states and step counters
    after an aggregating round (only the adapters are mixed), adapters = the uniform mix."""
    opts = TrustOptions(first_aggregation_round=1)
    sched = OptimizerConfig(lr=1e-2, schedule="one_cycle", total_steps=8, pct_start=0.25)
    p = problem.__class__(**{**vars(problem), "optimizer": sched})
    mixed_algo = trust_weighted(p, "fedavg", opts)
    local_algo = federated("local", p, local_aggregator(), shared_init=False)
    sim0 = mixed_algo.init(jax.random.key(2))
    mixed, _ = mixed_algo.round(sim0)
    alone, _ = local_algo.round(local_algo.init(jax.random.key(2)))
    for a, b in zip(
        jax.tree.leaves(mixed.clients.opt_state),
        jax.tree.leaves(alone.clients.opt_state),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    np.testing.assert_array_equal(mixed.clients.step, alone.clients.step)
    w = np.asarray(fedavg_matrix(N))
    for a, b in zip(
        jax.tree.leaves(mixed.clients.params), jax.tree.leaves(alone.clients.params), strict=True
    ):
        expected = np.einsum("ij,j...->i...", w, np.asarray(b, np.float64))
        np.testing.assert_allclose(np.asarray(a), expected, rtol=1e-5, atol=1e-7)
    # Per-client moments differ between clients: the state was not averaged.
    mu = jax.tree.leaves(mixed.clients.opt_state)[1]
    assert not np.allclose(np.asarray(mu[0]), np.asarray(mu[1]))


def test_masked_peers_get_zero_weight_and_oracle_matches_numpy(problem):
    opts = TrustOptions(topology="ring", top_k=8)
    _, history = _run(problem, "prediction", 1, opts)
    w = history[0]["aggregation"]["matrix"]
    ring = np.array([[abs(i - j) % N in (0, 1, N - 1) for j in range(N)] for i in range(N)])
    assert np.all(w[~ring] == 0.0) and np.all(w[ring] > 0)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
    _, history = _run(problem, "oracle", 1, TrustOptions())
    m = np.asarray(problem.side["mixtures"], np.float64)
    overlap = m @ m.T
    np.testing.assert_allclose(
        history[0]["aggregation"]["matrix"], overlap / overlap.sum(1, keepdims=True), atol=1e-6
    )


def test_every_method_runs_through_the_cli(tmp_path, capsys):
    methods = ["local", "fedavg", "pcl-fedavg", "pcl-oracle", "pcl-weights", "pcl-val", "pcl-pred"]
    out = tmp_path / "run"
    argv = ["demo", "--rounds", "2", "--methods", *methods, "--out", str(out), "--no-progress"]
    argv += ["--set", *TINY, "training.steps=1", "trust.first_aggregation_round=2", "trust.top_k=8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert all(f"| {m} |" in printed for m in methods)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if r["method"].startswith("pcl-") and r["round"] > 0:
            assert r["aggregated"] == (r["round"] >= 2)
            np.testing.assert_allclose(np.sum(r["trust"], axis=1), 1.0, rtol=1e-5)
            assert np.isfinite(r["val_mean_ppl"])
    assert (out / "trust.png").stat().st_size > 0


def test_a_bad_option_of_a_later_method_fails_before_any_training(tmp_path, capsys):
    """pcl-pred's top_k is checked against the vocabulary when the method is built: all methods
    are built before the first one trains, so nothing is computed or written."""
    out = tmp_path / "run"
    argv = ["demo", "--rounds", "2", "--methods", "local", "pcl-pred", "--out", str(out)]
    argv += ["--no-progress", "--set", *TINY, "trust.top_k=1000"]
    assert main(argv) == 2
    assert "trust.top_k=1000 exceeds the model's vocabulary" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()
