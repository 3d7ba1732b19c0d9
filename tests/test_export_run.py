"""`fedjax-lora export` end to end: a CLI run saves every method's final adapters; the export
gives PEFT files of the config's shapes and merged weights whose logits reproduce the run's
reported per-client perplexities."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from fedjax_lora import config as config_lib
from fedjax_lora import models
from fedjax_lora.algorithms.comigs import with_moe
from fedjax_lora.cli import main
from fedjax_lora.experiment import build_model, build_problem
from fedjax_lora.export import MIXTURE_FORMAT, load_run_adapters, merged_state_dict, with_client
from fedjax_lora.moe import MoEConfig
from tests.test_cli_imports import TINY
from tests.test_export import np_exported_mixture

D, FF, R = 32, 64, 8  # TINY's model.d_model, model.d_ff and the default LoRA rank
SHAPES = {  # GPT-2 module -> (in, out) of the default LoRA targets, one block (n_layers=1)
    "transformer.h.0.attn.c_attn": (D, 3 * D),
    "transformer.h.0.attn.c_proj": (D, D),
    "transformer.h.0.mlp.c_fc": (D, FF),
    "transformer.h.0.mlp.c_proj": (FF, D),
}


def _client_val_ppl(model, windows: np.ndarray, weights: np.ndarray) -> float:
    """exp(weighted mean next-token cross-entropy) over one client's windows `[W, T+1]`."""
    logits = np.asarray(jax.jit(lambda t: model(t))(windows[:, :-1]), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
    return float(np.exp((ce * weights).sum() / weights.sum()))


def test_cli_run_then_export_peft_and_merged(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["demo", "--rounds", "1", "--methods", "local", "--out", str(run), "--no-progress"]
    assert main([*argv, "--set", *TINY]) == 0
    summary = json.loads((run / "summary.json").read_text())["local"]
    names = summary["client_names"]

    assert main(["export", str(run), "--method", "local", "--client", names[1], "--out",
                 str(tmp_path / "peft")]) == 0  # fmt: skip
    peft_dir = tmp_path / "peft" / names[1]
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [names[1]]
    adapter_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == R and adapter_config["lora_alpha"] == 16.0
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    expected = {}
    for module, (n_in, n_out) in SHAPES.items():
        expected[f"base_model.model.{module}.lora_A.weight"] = (R, n_in)
        expected[f"base_model.model.{module}.lora_B.weight"] = (n_out, R)
    assert {k: v.shape for k, v in tensors.items()} == expected

    assert main(["export", str(run), "--method", "local", "--format", "merged", "--out",
                 str(tmp_path / "merged")]) == 0  # fmt: skip
    config = config_lib.from_dict(
        config_lib.ExperimentConfig, json.loads((run / "config.json").read_text())
    )
    problem, _ = build_problem(config)
    val = problem.eval_sets["val"]
    for c, name in enumerate(names):  # the library's client models, as the run reported them
        model = models.load(tmp_path / "merged" / name)
        ppl = _client_val_ppl(model, np.asarray(val.windows[c]), np.asarray(val.weights[c]))
        np.testing.assert_allclose(ppl, summary["val_ppl"][c], rtol=2e-4)

    # The PEFT tensors of client 1 are the difference between its merged weights and the base:
    # W' = W + (alpha / r) · (B A)ᵀ in GPT-2's Conv1D layout (in, out).
    base = merged_state_dict(build_model(config)[0])  # B = 0 at init: the base's own weights
    merged = load_file(tmp_path / "merged" / names[1] / "model.safetensors")
    for module in SHAPES:
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        np.testing.assert_allclose(
            base[f"{module}.weight"] + 16.0 / R * (b @ a).T,
            merged[f"{module}.weight"],
            rtol=1e-5,
            atol=1e-6,
        )

    capsys.readouterr()
    assert main(["export", str(run), "--method", "fedavg", "--out", str(tmp_path / "x")]) == 2
    assert "saved methods: ['local']" in capsys.readouterr().err


def test_hetlora_run_exports_each_clients_effective_lora_and_prompts_are_refused(tmp_path, capsys):
    """A HetLoRA run (per-client ranks on c_fc, evaluated after aggregation, as saved): each
    client's merged weights, from its rank-masked LoRA, reproduce the run's reported per-client
    perplexities, and its PEFT export holds only its active ranks. A soft-prompt method's export
    is refused in one line."""
    run = tmp_path / "run"
    ranks = [2, 4, 3] * 4  # the demo's 12 clients
    argv = ["demo", "--rounds", "1", "--methods", "hetlora", "fedprompt", "--out", str(run)]
    options = [
        f"method_options.hetlora.ranks=[{','.join(map(str, ranks))}]",
        "method_options.hetlora.ranked={targets: [mlp.c_fc], rank: 4, alpha: 16}",
        "method_options.hetlora.evaluate=aggregated",
        "method_options.fedprompt.prompt={num_virtual_tokens: 4}",
    ]
    assert main([*argv, "--no-progress", "--set", *TINY, *options]) == 0
    summary = json.loads((run / "summary.json").read_text())["hetlora"]
    names = summary["client_names"]

    assert main(["export", str(run), "--method", "hetlora", "--format", "merged", "--out",
                 str(tmp_path / "merged")]) == 0  # fmt: skip
    config = config_lib.from_dict(
        config_lib.ExperimentConfig, json.loads((run / "config.json").read_text())
    )
    problem, _ = build_problem(config)
    val = problem.eval_sets["val"]
    for c, name in enumerate(names):
        model = models.load(tmp_path / "merged" / name)
        ppl = _client_val_ppl(model, np.asarray(val.windows[c]), np.asarray(val.weights[c]))
        np.testing.assert_allclose(ppl, summary["val_ppl"][c], rtol=2e-4)

    assert main(["export", str(run), "--method", "hetlora", "--client", names[0], "--out",
                 str(tmp_path / "peft")]) == 0  # fmt: skip
    tensors = load_file(tmp_path / "peft" / names[0] / "adapter_model.safetensors")
    a = tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"]
    assert 1 <= a.shape[0] <= ranks[0] and a.shape[1] == D  # its active ranks only

    capsys.readouterr()
    assert main(["export", str(run), "--method", "fedprompt", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "soft prompts" in err and len(err.strip().splitlines()) == 1


def test_comigs_run_exports_attention_peft_plus_documented_experts(tmp_path, capsys):
    """A CoMiGS run (3 expert slots, top-2, clients with 3, 2 or 1 experts): `export --format
    peft` writes the attention LoRA as PEFT and the experts, router and expert mask in the
    documented layout (`experts.json`, `experts.safetensors`); a NumPy forward of the MoE-LoRA MLP
    from those files and the base's weights alone (router softmax over the top-k masked logits,
    expert LoRA deltas, mixing after the nonlinearity) reproduces the library's layer output, and
    the PEFT tensors its attention projection. `--format merged` is refused in one line."""
    run = tmp_path / "run"
    counts = [3, 2, 1] * 4  # the demo's 12 clients
    argv = ["demo", "--rounds", "1", "--methods", "comigs", "--out", str(run), "--no-progress"]
    options = [
        "method_options.comigs.moe={num_experts: 3, top_k: 2, rank: 2}",
        f"method_options.comigs.expert_counts=[{','.join(map(str, counts))}]",
        "method_options.comigs.router_batches=windows",
        "method_options.comigs.schedule.router_every=1",
        "method_options.comigs.schedule.router_steps=1",
    ]
    assert main([*argv, "--set", *TINY, *options]) == 0
    names = json.loads((run / "summary.json").read_text())["comigs"]["client_names"]
    assert main(["export", str(run), "--method", "comigs", "--out", str(tmp_path / "peft")]) == 0

    config = config_lib.from_dict(
        config_lib.ExperimentConfig, json.loads((run / "config.json").read_text())
    )
    base = merged_state_dict(build_model(config)[0])  # B = 0 at init: the base's own weights
    problem = with_moe(build_problem(config)[0], MoEConfig(num_experts=3, top_k=2, rank=2))
    template = nnx.merge_state(problem.template, problem.frozen)
    stacked, _ = load_run_adapters(run / "adapters" / "comigs.safetensors", template)
    m = "transformer.h.0.mlp"
    rng = np.random.default_rng(0)
    for c in (0, 1, 2):  # 3, 2 and 1 experts
        out = tmp_path / "peft" / names[c]
        manifest = json.loads((out / "experts.json").read_text())
        t = load_file(out / "experts.safetensors")
        assert manifest["format"] == MIXTURE_FORMAT and manifest["generalist"] == 0
        assert (manifest["num_experts"], manifest["top_k"], manifest["rank"]) == (3, 2, 2)
        assert manifest["gate"] == "linear" and manifest["blocks"][m]["output"] == "c_proj"
        assert manifest["blocks"][m]["expert_mask"] == [int(e < counts[c]) for e in range(3)]
        assert (
            {k: list(v.shape) for k, v in t.items()}
            == manifest["blocks"][m]["tensors"]
            == {
                f"{m}.experts.c_fc.lora_A.weight": [3, 2, D],
                f"{m}.experts.c_fc.lora_B.weight": [3, FF, 2],
                f"{m}.experts.c_proj.lora_A.weight": [3, 2, FF],
                f"{m}.experts.c_proj.lora_B.weight": [3, D, 2],
                f"{m}.router.weight": [3, D],
                f"{m}.expert_mask": [3],
            }
        )
        assert np.abs(t[f"{m}.experts.c_proj.lora_B.weight"]).max() > 0  # trained, B = 0 at init
        s = manifest["scale"]
        np.testing.assert_allclose(s, 16.0 / np.sqrt(2.0))

        h = rng.normal(size=(7, D)).astype(np.float64)
        y, w = np_exported_mixture(t, manifest, base, m, h)
        model = with_client(problem.graphdef, stacked, problem.base, c)
        got = np.asarray(model.transformer.h[0].mlp(jnp.asarray(h[None], jnp.float32)))[0]
        np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)
        assert counts[c] > 1 or np.allclose(w[:, 0], 1.0)  # one expert: the generalist alone

        # The attention LoRA as PEFT: x W + b + (alpha / r) · x Aᵀ Bᵀ is the library's c_attn.
        peft = load_file(out / "adapter_model.safetensors")
        adapter_config = json.loads((out / "adapter_config.json").read_text())
        attn = "transformer.h.0.attn.c_attn"
        assert not any(".mlp." in k for k in peft)
        a, b = (
            peft[f"base_model.model.{attn}.lora_A.weight"],
            peft[f"base_model.model.{attn}.lora_B.weight"],
        )
        want = h @ base[f"{attn}.weight"] + base[f"{attn}.bias"]
        want = want + adapter_config["lora_alpha"] / adapter_config["r"] * (h @ a.T) @ b.T
        got = np.asarray(model.transformer.h[0].attn.c_attn(jnp.asarray(h, jnp.float32)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    capsys.readouterr()
    argv = ["export", str(run), "--method", "comigs", "--format", "merged"]
    assert main([*argv, "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "routes each token" in err and len(err.strip().splitlines()) == 1
