"""DP, robust reductions and communication accounting wired into runs (`algorithms.base`
`with_global_rule`, `ServerProgram.comm`, `experiment.round_costs`), against independent
references: a NumPy loop of clipping and averaging, `dp_accounting` called directly, hand counts
of the LoRA tensors, and a poisoned client that the median resists and the mean does not."""

from __future__ import annotations

import dataclasses
import json

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting import rdp

from fedjax_lora import config as config_lib
from fedjax_lora.algorithms import lora_baselines
from fedjax_lora.algorithms.base import DP_KEY_STREAM, RoundInputs, build
from fedjax_lora.errors import ConfigError
from fedjax_lora.experiment import build_problem, method_factory, train_and_evaluate
from fedjax_lora.settings import GlobalRule

N, D, R, V, S = 4, 16, 2, 256, 16  # clients, d_model, LoRA rank, vocabulary, reference windows
# One LoRA on the fused attention projection c_attn (16 -> 48) of one layer, rank 2, f32.
LORA_BYTES = (D * R + R * 3 * D) * 4
OVERRIDES = [
    "data.num_groups=2",
    "data.clients_per_group=2",
    "data.tokens_per_client=1200",
    f"data.reference_sequences={S}",
    f"model.d_model={D}",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.d_ff=32",
    "model.max_positions=64",
    "lora.targets=[c_attn]",
    f"lora.rank={R}",
    "training.steps=2",
    "training.batch_size=2",
    "training.seq_len=16",
    "eval.max_windows=4",
    "eval.batch_size=4",
    "rounds=2",
    "tracking.progress=false",
    "tracking.tensorboard=false",
]


def _config(*extra: str) -> config_lib.ExperimentConfig:
    return config_lib.load(None, [*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def setup():
    config = _config()
    problem, _ = build_problem(config)
    return config, problem


def _flat(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(tree))]


def test_dp_round_matches_a_numpy_reference(setup):
    """One dp-fedavg round: the clients' updates clipped to C over all adapters (NumPy), their
    mean, plus z C / N times the normal draws of the key `fold_in(init key, DP_KEY_STREAM)`."""
    config, problem = setup
    c, z = 0.05, 0.5
    config = dataclasses.replace(
        config, method_options={"dp-fedavg": {"dp": {"clip_norm": c, "noise_multiplier": z}}}
    )
    algo = method_factory("dp-fedavg", config)(problem)
    sim0 = algo.init(jax.random.key(7))
    sim1, _ = algo.round(sim0)
    inputs = RoundInputs(problem.train, problem.eval_sets, problem.base, sim0.round)
    trained, _ = jax.jit(algo.method.client.update)(sim0.clients, inputs)

    theta = [x[0] for x in _flat(sim0.clients.params)]  # shared init: every row the same
    rows = _flat(trained.params)
    pairs = list(zip(rows, theta, strict=True))
    norms = [np.sqrt(sum(np.sum((x[i] - t) ** 2) for x, t in pairs)) for i in range(N)]
    assert max(norms) > c  # the clipping bites
    scale = [min(1.0, c / norm) for norm in norms]
    mean = [t + sum(scale[i] * (x[i] - t) for i in range(N)) / N for x, t in pairs]
    key = jax.random.fold_in(jax.random.key(7), DP_KEY_STREAM)
    noise_key = jax.random.split(key, 3)[1]
    keys = jax.random.split(noise_key, len(theta))
    noise = [np.asarray(jax.random.normal(k, t.shape)) for k, t in zip(keys, theta, strict=True)]
    for got, m, e in zip(_flat(sim1.clients.params), mean, noise, strict=True):
        want = m + z * c / N * e
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-4, atol=1e-6)


def _accountant_epsilon(z: float, n: int, k: int, rounds: int, delta: float) -> float:
    """ε of `rounds` cohorts of exactly `k` of `n` clients (dp_accounting, replace-one RDP)."""
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    event = dp_accounting.SampledWithoutReplacementDpEvent(n, k, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def test_run_records_bytes_and_epsilon(tmp_path):
    """fedavg and dp-fedavg with a cohort of 2 of 4: every round, each drawn client moves the
    LoRA tensors up and down (hand count), the others nothing; ε after t rounds is
    dp_accounting's for (q = 2/4, z, t, δ); the summary holds the totals, ε and δ."""
    z, delta = 1.2, 1e-3
    config = _config(
        "methods=[fedavg, dp-fedavg]",
        "data.cohort_size=2",
        f"method_options.dp-fedavg.dp={{noise_multiplier: {z}, delta: {delta}}}",
    )
    summary = train_and_evaluate(config, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by_method = {m: [r for r in records if r["method"] == m] for m in ("fedavg", "dp-fedavg")}
    for method, rounds in by_method.items():
        assert rounds[0]["upload_bytes"] == [0] * N and rounds[0]["cumulative_bytes"] == 0
        for r in rounds[1:]:
            want = [LORA_BYTES if i in r["cohort"] else 0 for i in range(N)]
            assert r["upload_bytes"] == want and r["download_bytes"] == want
        assert rounds[-1]["cumulative_bytes"] == 2 * 2 * 2 * LORA_BYTES  # rounds, clients, ways
        s = summary[method]
        assert s["total_bytes"] == 8 * LORA_BYTES
        assert s["upload_bytes_per_client_round"] == LORA_BYTES
    dp = by_method["dp-fedavg"]
    assert dp[0]["epsilon"] == 0.0
    for t in (1, 2):
        want = _accountant_epsilon(z, N, 2, t, delta)
        assert dp[t]["epsilon"] == pytest.approx(want, rel=1e-9) and dp[t]["delta"] == delta
    assert summary["dp-fedavg"]["epsilon"] == dp[-1]["epsilon"]
    assert summary["dp-fedavg"]["delta"] == delta
    assert "epsilon" not in summary["fedavg"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["dp-fedavg"]["epsilon"] == pytest.approx(dp[-1]["epsilon"])
    assert "MB exchanged" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "bytes.png").is_file()


def test_uncertifiable_dp_is_refused_before_training(tmp_path):
    config = _config("methods=[fedavg]", "aggregation.dp={delta: 0.5}")
    with pytest.raises(ConfigError, match=r"dp: delta = 0.5 must be in \(0, 1/num_clients"):
        train_and_evaluate(config, tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("extra", "method", "match"),
    [
        (["aggregation.dp={noise_multiplier: 0}"], "fedavg", "dp: noise_multiplier = 0"),
        (["aggregation.reduction=median"], "pcl-val", "has no global part"),
        (["aggregation.reduction=krum", "aggregation.f=1"], "fedavg", "aggregation.f = 1"),
        (["aggregation.reduction=trimmed_mean", "aggregation.beta=0.1"], "fedavg", "beta"),
        (
            ["data.cohort_size=2", "data.cohort_sampling=tokens", "aggregation.dp={}"],
            "fedavg",
            "cohort_sampling",
        ),
        (["aggregation.dp={adaptive_quantile: 0.5}"], "fedavg", "count_noise_std"),
        (["aggregation.dp={}"], "dp-fedavg", "both set DP"),
    ],
)
def test_settings_that_make_no_sense_are_refused_in_one_line(extra, method, match):
    config = _config(f"methods=[{method}]", *extra)
    problem, _ = build_problem(config)
    with pytest.raises(ConfigError, match=match) as info:
        method_factory(method, config)(problem)
    assert "\n" not in str(info.value)


def test_dp_with_a_robust_reduction_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="aggregation.dp needs aggregation.reduction = mean"):
        _config("aggregation.reduction=median", "aggregation.dp={}")


def test_local_methods_ignore_the_rule(setup):
    config, problem = setup
    ruled = dataclasses.replace(problem, global_rule=GlobalRule("median"))
    algo = method_factory("local", config)(ruled)
    assert algo.method.server.dp is None


def test_median_resists_a_poisoned_client(setup):
    """Client 0 uploads its adapters shifted by +10: FedAvg's model moves by 10/4 on every
    coordinate, the coordinate-wise median stays within the honest clients' range."""
    config, problem = setup
    fedavg = method_factory("fedavg", config)(problem).method

    def poisoned(clients, inputs):
        clients, metrics = fedavg.client.update(clients, inputs)
        bad = jax.tree.map(lambda x: x.at[0].add(10.0), clients.params)
        return clients._replace(params=bad), metrics

    method = fedavg._replace(client=fedavg.client._replace(update=poisoned))
    honest = method_factory("fedavg", config)(problem)
    sim = honest.init(jax.random.key(0))
    inputs = RoundInputs(problem.train, problem.eval_sets, problem.base, sim.round)
    trained = _flat(jax.jit(fedavg.client.update)(sim.clients, inputs)[0].params)
    results = {}
    for rule in ("mean", "median"):
        algo = build(dataclasses.replace(problem, global_rule=GlobalRule(rule)), method)
        new, metrics = algo.round(algo.init(jax.random.key(0)))
        results[rule] = (_flat(new.clients.params), float(np.mean(metrics["val"]["ppl"])))
    finals = zip(results["mean"][0], results["median"][0], strict=True)
    for x, (mean, median) in zip(trained, finals, strict=True):
        honest_rows = x[1:]
        assert np.all(median[0] <= honest_rows.max(0) + 1e-5)
        assert np.all(median[0] >= honest_rows.min(0) - 1e-5)
        np.testing.assert_allclose(mean[0], (x[0] + 10.0 + honest_rows.sum(0)) / N, atol=1e-4)
    assert results["median"][1] < results["mean"][1]


def test_hetlora_bytes_follow_each_clients_rank(setup):
    """HetLoRA with ranks [1, 2, 2, 4] on the MLP (c_fc 16 -> 32, c_proj 32 -> 16): client i
    moves r_i (16 + 32) · 2 values of the ranked LoRA plus the attention LoRA in full."""
    _, problem = setup
    ranks = [1, 2, 2, 4]
    algo = lora_baselines.hetlora(problem, lora_baselines.HetLoRAOptions(ranks=tuple(ranks)))
    sim = algo.init(jax.random.key(0))
    exchange = algo.method.server.comm(jax.device_get(sim.clients))
    want = [LORA_BYTES + r * (16 + 32) * 2 * 4 for r in ranks]
    assert exchange.upload.tolist() == want and exchange.download.tolist() == want


def test_trust_rules_count_what_they_exchange():
    """pcl-pred adds the reference logits [S, V] (own up, N − 1 peers' down); pcl-val downloads the
    N − 1 peers' adapters and uploads its perplexity row."""
    config = _config("methods=[pcl-pred,pcl-val]")  # pcl-pred's reference set is its side data
    problem, _ = build_problem(config)
    pred = method_factory("pcl-pred", config)(problem)
    exchange = pred.method.server.comm(jax.device_get(pred.init(jax.random.key(0)).clients))
    logits = S * V * 4
    assert exchange.upload.tolist() == [LORA_BYTES + logits] * N
    assert exchange.download.tolist() == [LORA_BYTES + (N - 1) * logits] * N
    val = method_factory("pcl-val", config)(problem)
    exchange = val.method.server.comm(jax.device_get(val.init(jax.random.key(0)).clients))
    assert exchange.upload.tolist() == [LORA_BYTES + 4 * N] * N
    assert exchange.download.tolist() == [(N - 1) * LORA_BYTES] * N


def test_dp_inside_a_server_optimizer(setup):
    """DP-FedAdam (`method_options.fedadam.dp`): the server optimizer stays around the DP rule,
    whose noise key is still drawn from the simulation's key; one round stays finite."""
    config, problem = setup
    config = dataclasses.replace(config, method_options={"fedadam": {"dp": {"clip_norm": 0.1}}})
    algo = method_factory("fedadam", config)(problem)
    assert algo.method.server.dp is not None
    sim = algo.init(jax.random.key(3))
    want = jax.random.key_data(jax.random.fold_in(jax.random.key(3), DP_KEY_STREAM))
    np.testing.assert_array_equal(sim.agg_state.inner.key, want)
    new, _ = algo.round(sim)
    assert all(np.all(np.isfinite(x)) for x in _flat(new.clients.params))
