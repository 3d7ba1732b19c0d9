"""Figures (`fedjax_lora.plots`), `experts.png` of runs with an expert assignment, and the report
picking up every figure of a run directory."""

from __future__ import annotations

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lora import amole
from fedjax_lora import config as config_lib
from fedjax_lora.aggregation import local_aggregator
from fedjax_lora.algorithms import METHODS, Method, aggregating, build, register, standard_client
from fedjax_lora.algorithms.fedamole import expert_record, with_amole
from fedjax_lora.experiment import train_and_evaluate
from fedjax_lora.plots import plot_bytes, plot_expert_assignment, plot_history, plot_trust
from fedjax_lora.report import write_report
from tests.test_cli import TINY

PNG = b"\x89PNG"


def test_expert_assignment_panels_show_counts_and_modules(tmp_path):
    rng = np.random.default_rng(0)
    runs = {
        "fedamole": rng.uniform(size=(3, 5, 4)) < 0.5,
        "fedamole-r": rng.uniform(size=(3, 5, 4)) < 0.5,
    }
    names = ["a", "b", "c", "d"]
    fig = plot_expert_assignment(
        runs, names, tmp_path / "experts.png", module_names=["q0", "v0", "q1"], max_modules=2
    )
    assert (tmp_path / "experts.png").read_bytes()[:4] == PNG
    panels = [ax for ax in fig.axes if ax.images]  # colorbars hold no images
    assert len(panels) == 2 * 3  # per run: the count over modules, then 2 of the 3 modules
    for row, x in enumerate(runs.values()):
        count, first, second = panels[3 * row : 3 * row + 3]
        np.testing.assert_array_equal(count.images[0].get_array(), x.astype(int).sum(0))
        np.testing.assert_array_equal(first.images[0].get_array(), x[0])
        np.testing.assert_array_equal(second.images[0].get_array(), x[1])
        assert (first.get_title(), second.get_title()) == ("q0", "v0")
        assert [t.get_text() for t in first.get_xticklabels()] == names
    assert "1 more module(s) not shown" in fig.get_suptitle()

    single = plot_expert_assignment(np.eye(4, dtype=bool), names)  # one module [E, C]
    assert [ax for ax in single.axes if ax.images][0].images[0].get_array().shape == (4, 4)


@pytest.mark.parametrize(
    ("assign", "names", "message"),
    [
        (np.zeros((2, 3, 4, 5), bool), list("abcde"), r"bool \[M, E, C\] or \[E, C\]"),
        (np.zeros((3, 4), bool), list("abc"), "4 clients on its last axis but 3 client_names"),
    ],
)
def test_expert_assignment_rejects_bad_shapes(assign, names, message):
    with pytest.raises(ValueError, match=message):
        plot_expert_assignment(assign, names)


def test_history_and_trust_figures(tmp_path):
    ppl = np.array([[9.0, 7.0, 5.0], [6.0, 4.0, 2.0]])  # rounds x clients
    history = {"local": [{"round": r, "val_ppl": ppl[r].tolist()} for r in range(2)]}
    fig = plot_history(history, tmp_path / "ppl.png")
    mean = fig.axes[0].lines[-1]
    np.testing.assert_allclose(mean.get_ydata(), [7.0, 4.0])
    w = np.full((3, 3), 1 / 3)
    fig = plot_trust({"pcl-val": w}, ["x", "y", "z"], tmp_path / "trust.png", "t")
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), w)
    for name in ("ppl.png", "trust.png"):
        assert (tmp_path / name).read_bytes()[:4] == PNG


# A cheap method whose state carries expert masks as FedAMoLE's does (`ClientState.frozen`, an
# `ExpertMask` state `bool [N, E]` per AMoLE module, here on c_attn.q and c_attn.v): local
# training with fixed masks (every client holds top_k = 1 or more experts), reporting its
# assignment with FedAMoLE's analysis (`expert_record`).
HELD = [
    np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], bool),
    np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1], [1, 0, 0]], bool),
]
AMOLE = amole.AMoLEConfig(targets=("c_attn.q", "c_attn.v"), num_experts=3, rank=2, top_k=1)


def masked_local(problem, options):
    del options  # registered without options
    problem = with_amole(problem, AMOLE)
    masks = amole.expert_masks(problem.frozen)
    held = dict(zip(sorted(amole.by_module(masks)), HELD, strict=True))  # in path order
    flat = [
        (p, v.replace(jnp.asarray(held[amole.module_path(p[:-1])])))
        for p, v in nnx.to_flat_state(masks)
    ]
    client = standard_client(problem, shared_init=False)
    init = lambda key: client.init(key)._replace(frozen=nnx.from_flat_state(flat))
    method = Method(
        "masked-local",
        client._replace(init=init),
        aggregating(local_aggregator()),
        analyses=expert_record,
    )
    return build(problem, method)


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("masked")
    config = config_lib.load(
        None,
        [
            *TINY,
            "data.num_groups=2",
            "data.clients_per_group=2",
            "rounds=1",
            "methods=[masked-local]",
        ],
    )
    register("masked-local", masked_local)
    try:
        train_and_evaluate(config, out, progress=False)
    finally:
        METHODS.pop("masked-local")
    return out


def test_run_with_an_expert_assignment_logs_and_plots_it(masked_run):
    records = [json.loads(line) for line in (masked_run / "metrics.jsonl").read_text().splitlines()]
    assert "experts" not in records[0]  # only the final record holds the assignment
    experts = records[-1]["experts"]
    assert sorted(experts) == [
        "transformer.h.0.attn.c_attn.lora_q",
        "transformer.h.0.attn.c_attn.lora_v",
    ]
    for module, held in zip(sorted(experts), HELD, strict=True):  # [E, C]: c holds expert e
        np.testing.assert_array_equal(np.asarray(experts[module], bool), held.T)
    assert (masked_run / "experts.png").read_bytes()[:4] == PNG


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_report_includes_experts_and_any_extra_figure(masked_run, fmt):
    (masked_run / "routing.png").write_bytes((masked_run / "ppl.png").read_bytes())
    (masked_run / "notes.txt").write_text("not a figure")
    text = write_report(masked_run, fmt).read_text()
    if fmt == "md":
        for name in ("ppl.png", "bytes.png", "trust.png", "experts.png", "routing.png"):
            assert f"]({name})" in text
        assert "notes.txt" not in text
    else:
        assert text.count('src="data:image/png;base64,') == 5  # ppl, bytes, trust, ..., routing
        assert "Final expert assignment" in text and "routing (routing.png)" in text


def test_bytes_figure_plots_perplexity_against_cumulative_bytes(tmp_path):
    """One line per exchanging method through (cumulative MB, mean perplexity) of rounds 1..R;
    a method that exchanges nothing is a dashed level at its final mean."""
    record = lambda r, sent, ppl: {"round": r, "cumulative_bytes": sent, "val_ppl": ppl}
    history = {
        "fedavg": [record(0, 0, [9, 7]), record(1, 2e6, [6, 4]), record(2, 4e6, [4, 2])],
        "local": [record(0, 0, [9.0, 7.0]), record(1, 0, [7.0, 5.0])],
    }
    fig = plot_bytes(history, tmp_path / "bytes.png")
    (ax,) = fig.axes
    line, level = ax.get_lines()  # fedavg's line, local's dashed level
    np.testing.assert_allclose(line.get_xdata(), [2.0, 4.0])
    np.testing.assert_allclose(line.get_ydata(), [5.0, 3.0])
    np.testing.assert_allclose(level.get_ydata(), [6.0, 6.0])
    assert level.get_linestyle() == "--"
    assert "MB exchanged" in ax.get_xlabel() and "perplexity" in ax.get_ylabel()
    assert (tmp_path / "bytes.png").read_bytes()[:4] == PNG


def test_bytes_figure_takes_warm_up_rounds_and_many_methods(tmp_path):
    """Rounds before the first exchange (0 bytes, e.g. trust's warm-up) and 30 methods spanning
    four decades: the figure is written, the legend sits outside the panel in two columns, and
    only decades label the log axis."""
    record = lambda r, sent: {"round": r, "cumulative_bytes": sent, "val_ppl": [5.0 - r]}
    history = {"warm": [record(0, 0), record(1, 0), record(2, 3e6)]}
    history |= {f"m{i}": [record(0, 0), record(1, 10 ** (4 + i / 8))] for i in range(30)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no collapsed layout
        fig = plot_bytes(history, tmp_path / "bytes.png")
    (legend,) = fig.legends
    assert legend._ncols == 2 and len(legend.get_texts()) == 31
    (ax,) = fig.axes
    fig.canvas.draw()
    minor = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
    assert minor == []
