"""PEFT export (names, shapes, the function it encodes) and merged-weight export (round trip
through the loader)."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from fedjax_lora import export, lora, models
from fedjax_lora.aggregation.ranks import map_ranked, truncate
from fedjax_lora.algorithms import model_of
from fedjax_lora.algorithms.comigs import with_moe
from fedjax_lora.algorithms.fedamole import with_amole
from fedjax_lora.algorithms.lora_baselines import rank_scales, with_ranks
from fedjax_lora.algorithms.prompt_baselines import with_prompt
from fedjax_lora.amole import AMoLEConfig
from fedjax_lora.engine.state import ClientState
from fedjax_lora.models.layers import Adapter, ClientFrozen
from fedjax_lora.models.weights import hf_param_names
from fedjax_lora.moe import MoEConfig, set_expert_counts
from fedjax_lora.prompt_tuning import PromptTuningConfig
from tests.test_comigs_moe import GPT2, LLAMA, moe_model
from tests.tiny import CONFIG, tiny_model, tiny_problem


def _trained_like(model):
    """Random (non-zero) B so the adapters change the function."""
    graphdef, adapters, base = lora.split(model)
    leaves, treedef = jax.tree.flatten(adapters)
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), base)


@pytest.fixture(scope="module")
def sliced():
    return _trained_like(tiny_model(targets=("c_attn.q", "c_attn.v", "mlp.c_fc"), rank=4))


def test_peft_names_shapes_and_config(tmp_path, sliced):
    export.to_peft(sliced, tmp_path, base_model_name_or_path="tiny-gpt2")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    d, ff = CONFIG.d_model, CONFIG.d_ff
    for layer in range(CONFIG.n_layers):
        pre = f"base_model.model.transformer.h.{layer}"
        # q and v slices combine into one rank-8 LoRA on the fused c_attn
        assert tensors[f"{pre}.attn.c_attn.lora_A.weight"].shape == (8, d)
        assert tensors[f"{pre}.attn.c_attn.lora_B.weight"].shape == (3 * d, 8)
        assert tensors[f"{pre}.mlp.c_fc.lora_A.weight"].shape == (4, d)
        assert tensors[f"{pre}.mlp.c_fc.lora_B.weight"].shape == (ff, 4)
    assert len(tensors) == 4 * CONFIG.n_layers
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    assert config["r"] in (4, 8) and config["base_model_name_or_path"] == "tiny-gpt2"
    pattern = re.compile(config["target_modules"])
    assert pattern.fullmatch("transformer.h.0.attn.c_attn")
    assert not pattern.fullmatch("transformer.h.0.attn.c_proj")


def test_peft_tensors_encode_the_same_delta(tmp_path, sliced):
    """Rebuild every projection's output from the PEFT tensors alone (NumPy) and compare with
    the model's adapted projection."""
    export.to_peft(sliced, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    x = np.random.default_rng(1).normal(size=(5, CONFIG.d_model)).astype(np.float32)
    block = sliced.transformer.h[0]
    for name, linear in (("attn.c_attn", block.attn.c_attn), ("mlp.c_fc", block.mlp.c_fc)):
        module = f"transformer.h.0.{name}"
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        r = config["rank_pattern"].get(module, config["r"])
        alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
        kernel, bias = np.asarray(linear.kernel[...]), np.asarray(linear.bias[...])
        expected = x @ kernel + bias + (alpha / r) * (x @ a.T) @ b.T
        np.testing.assert_allclose(np.asarray(linear(jnp.asarray(x))), expected, atol=1e-4)


def test_merged_weights_reload_to_the_same_logits(tmp_path, sliced):
    export.save_merged(sliced, tmp_path)
    reloaded = models.load(tmp_path)
    tokens = jnp.arange(12).reshape(1, 12) % CONFIG.vocab_size
    np.testing.assert_allclose(reloaded(tokens), sliced(tokens), atol=1e-4)
    graphdef, adapters, _ = lora.split(reloaded)
    assert not jax.tree.leaves(adapters)


def test_client_row_of_a_stacked_tree_is_exported():
    model = tiny_model()
    graphdef, template, base = lora.split(model)
    stacked = jax.vmap(lora.init_adapters, (None, 0))(
        template, jax.random.split(jax.random.key(0), 3)
    )
    one = export.with_client(graphdef, stacked, base, 2)
    a = one.transformer.h[0].attn.c_attn.lora_q.a[...]
    np.testing.assert_array_equal(
        a, stacked["transformer"]["h"][0]["attn"]["c_attn"]["lora_q"]["a"][2]
    )


def test_exporting_a_model_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export.to_peft(models.from_config(CONFIG), tmp_path)


# ---------------------------------------------------------------- methods' adapters

RANKS = (2, 4, 3)
RANKED = lora.LoRAConfig(targets=("mlp.c_fc",), rank=4, alpha=16.0, scaling="alpha/sqrt(r)")


@pytest.fixture(scope="module")
def ranked_clients():
    """A HetLoRA problem (ranked LoRA on c_fc, ranks 2, 4, 3, attention LoRA on q and v) and its
    clients' state: random adapters truncated to each client's rank, rank scales from
    `rank_scales`, with client 1's rank 2 pruned (a zero scale inside its active prefix)."""
    problem = with_ranks(tiny_problem(num_clients=3), RANKS, RANKED)
    rng = np.random.default_rng(3)
    leaves, treedef = jax.tree.flatten(problem.template)
    stacked = [jnp.asarray(rng.normal(0, 0.3, (3, *x.shape)), x.dtype) for x in leaves]
    params = jax.tree.unflatten(treedef, stacked)
    frozen = rank_scales(problem.frozen, RANKS, RANKED)
    frozen = jax.tree.map(lambda m: m.at[1, 2].set(0.0), frozen)
    merged = map_ranked(
        nnx.merge_state(params, frozen), lambda _, a, b, m: (*truncate(a, b, m > 0), m)
    )
    clients = ClientState(params, None, None, None, None, None, {}, frozen)
    return problem, clients._replace(params=nnx.split_state(merged, Adapter, ...)[0])


@pytest.mark.parametrize("client", range(3))
def test_hetlora_client_exports_its_effective_rank_masked_lora(tmp_path, ranked_clients, client):
    """PEFT tensors of a ranked client: the active ranks only, and `W x + (α/r) B A x` equals
    NumPy's `W x + ((x A) ⊙ m) B` from the client's stored factors and rank scales; its merged
    weights reload to the client model's logits."""
    problem, clients = ranked_clients
    stacked = export.client_model_state(clients)
    model = export.with_client(problem.graphdef, stacked, problem.base, client)
    export.to_peft(model, tmp_path / "peft")
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    module = "transformer.h.0.mlp.c_fc"
    row = stacked["transformer"]["h"][0]["mlp"]["c_fc"]["lora"]
    a, b, m = (np.asarray(row[k][client], np.float64) for k in ("a", "b", "rank_scale"))
    active = int((m > 0).sum())
    assert active == RANKS[client] - (client == 1)
    lora_a = tensors[f"base_model.model.{module}.lora_A.weight"]
    lora_b = tensors[f"base_model.model.{module}.lora_B.weight"]
    assert lora_a.shape == (active, CONFIG.d_model) and lora_b.shape == (CONFIG.d_ff, active)
    r = config["rank_pattern"].get(module, config["r"])
    alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
    x = np.random.default_rng(1).normal(size=(5, CONFIG.d_model))
    linear = model.transformer.h[0].mlp.c_fc
    kernel, bias = np.asarray(linear.kernel[...], np.float64), np.asarray(linear.bias[...])
    want = x @ kernel + bias + ((x @ a) * m) @ b
    np.testing.assert_allclose(x @ kernel + bias + alpha / r * (x @ lora_a.T) @ lora_b.T, want,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    np.testing.assert_allclose(np.asarray(linear(jnp.asarray(x, jnp.float32))), want, atol=1e-4)
    export.save_merged(model, tmp_path / "merged")
    tokens = jnp.arange(12).reshape(1, 12) % CONFIG.vocab_size
    np.testing.assert_allclose(models.load(tmp_path / "merged")(tokens), model(tokens), atol=1e-4)


def test_fedamole_mixtures_and_soft_prompts_are_refused(tmp_path):
    """FedAMoLE's mixtures of LoRA experts and soft prompts have no LoRA form: both exports
    refuse them, naming the module. CoMiGS's mixtures export to PEFT (the attention LoRA plus
    `experts.safetensors`), but have no merged weights: `save_merged` refuses them."""
    problem = tiny_problem(num_clients=2)
    amole_config = AMoLEConfig(targets=("c_attn.q",), num_experts=2, rank=2, top_k=1)
    for changed, kind in (
        (with_amole(problem, amole_config), "AMoLE"),
        (with_prompt(problem, PromptTuningConfig(num_virtual_tokens=2)), "SoftPrompt"),
    ):
        model = model_of(changed)
        for write in (export.to_peft, export.save_merged):
            with pytest.raises(ValueError, match=f"{kind} adapters have no LoRA form"):
                write(model, tmp_path)
    moe = model_of(with_moe(problem, MoEConfig(num_experts=2, rank=2)))
    with pytest.raises(ValueError, match="mixture of LoRA experts routes each token"):
        export.save_merged(moe, tmp_path / "merged")
    written = sorted(p.name for p in export.to_peft(moe, tmp_path / "peft").iterdir())
    assert written == [
        "adapter_config.json", "adapter_model.safetensors", "experts.json", "experts.safetensors"
    ]  # fmt: skip


def _np_gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _np_top_k_weights(z: np.ndarray, k: int) -> np.ndarray:
    """Mixture weights `[T, E]` from masked logits `z [T, E]` (`-inf` off the client's experts):
    softmax over the `k` largest logits (k >= 2), or the unnormalised top-1 probability."""
    w = np.zeros_like(z)
    for t in range(z.shape[0]):
        if k == 1:
            p = np.exp(z[t] - z[t].max())
            e = int(np.argmax(z[t]))
            w[t, e] = p[e] / p.sum()
            continue
        top = np.argsort(-z[t], kind="stable")[:k]
        p = np.exp(z[t, top] - z[t, top].max())
        w[t, top] = p / p.sum()
    return w


def np_exported_mixture(tensors, manifest, base, m, h):
    """`(y [T, d], w [T, E])`: mixture block `m` on the MLP inputs `h [T, d]` from its exported
    tensors and `experts.json` alone (`docs/export.md`) and the base's Hugging Face weights `base`
    (GPT-2 Conv1D `(in, out)`, Llama `(out, in)`), in f64."""
    s, k, family = manifest["scale"], manifest["top_k"], manifest["family"]
    mask = tensors[f"{m}.expert_mask"].astype(bool)
    if manifest["gate"] is None:
        w = np.ones((h.shape[0], 1))
    else:
        z = h @ tensors[f"{m}.router.weight"].T.astype(np.float64)
        if manifest["gate"] == "tanh_mlp":
            z = np.tanh(z) @ tensors[f"{m}.router.out.weight"].T
        w = _np_top_k_weights(np.where(mask, z, -np.inf), k)

    def proj(name, x, e):
        kernel = base[f"{m}.{name}.weight"]
        y = x @ kernel if family == "gpt2" else x @ kernel.T
        if f"{m}.{name}.bias" in base:
            y = y + base[f"{m}.{name}.bias"]
        a = tensors[f"{m}.experts.{name}.lora_A.weight"][e]
        b = tensors[f"{m}.experts.{name}.lora_B.weight"][e]
        return y + s * (x @ a.T) @ b.T

    y = 0.0
    for e in range(w.shape[1]):
        if family == "gpt2":
            out = proj("c_proj", _np_gelu_tanh(proj("c_fc", h, e)), e)
        else:
            gate = proj("gate_proj", h, e)
            out = proj("down_proj", gate / (1.0 + np.exp(-gate)) * proj("up_proj", h, e), e)
        y = y + w[:, e : e + 1] * out
    return y, w


@pytest.mark.parametrize(
    ("family_cfg", "top_k", "gate", "count"),
    [(GPT2, 1, "linear", 3), (GPT2, 2, "linear", 2), (LLAMA, 2, "tanh_mlp", 3)],
    ids=["gpt2-k1", "gpt2-k2-two-of-three", "llama-tanh-k2"],
)
def test_exported_mixture_reproduces_the_block(tmp_path, family_cfg, top_k, gate, count):
    """`to_peft` on a CoMiGS model (random non-zero adapters, `count` of 3 experts held): a NumPy
    forward from `experts.safetensors`, `experts.json` and the base's HF weights reproduces
    every mixture block's output; the attention LoRA is in the PEFT files."""
    model = moe_model(family_cfg, MoEConfig(num_experts=3, top_k=top_k, rank=2, gate=gate))
    frozen = set_expert_counts(nnx.state(model, ClientFrozen), count)
    nnx.update(model, frozen)
    out = export.to_peft(model, tmp_path)
    tensors = load_file(out / "experts.safetensors")
    manifest = json.loads((out / "experts.json").read_text())
    assert manifest["format"] == export.MIXTURE_FORMAT and manifest["gate"] == gate
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    base = {
        hf: np.asarray(flat[path].get_value(), np.float64).T
        if transpose
        else np.asarray(flat[path].get_value(), np.float64)
        for hf, (path, transpose) in hf_param_names(model).items()
    }
    layers = model.transformer.h if family_cfg.family == "gpt2" else model.model.layers
    h = np.random.default_rng(0).normal(size=(6, family_cfg.d_model))
    for i, layer in enumerate(layers):
        m = f"transformer.h.{i}.mlp" if family_cfg.family == "gpt2" else f"model.layers.{i}.mlp"
        assert manifest["blocks"][m]["expert_mask"] == [int(e < count) for e in range(3)]
        want, w = np_exported_mixture(tensors, manifest, base, m, h)
        assert np.all(w[:, count:] == 0) and np.all((w > 0).sum(1) == min(top_k, count))
        got = np.asarray(layer.mlp(jnp.asarray(h[None], jnp.float32)))[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    peft = load_file(out / "adapter_model.safetensors")
    assert peft and not any(".mlp." in name for name in peft)
