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
from tests.tiny import CONFIG, tiny_model


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
