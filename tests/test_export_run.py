"""`fedjax-lora export` end to end: a CLI run saves every method's final adapters; the export
gives PEFT files of the config's shapes and merged weights whose logits reproduce the run's
reported per-client perplexities."""

from __future__ import annotations

import json

import jax
import numpy as np
from safetensors.numpy import load_file

from fedjax_lora import config as config_lib
from fedjax_lora import models
from fedjax_lora.cli import main
from fedjax_lora.experiment import build_model, build_problem
from fedjax_lora.export import merged_state_dict
from tests.test_cli_imports import TINY

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
