"""LoRA adapters on the loaded fixture models, checked against independent NumPy formulas."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lora import lora, models
from fedjax_lora.lora import LoRAConfig

FIXTURES = Path(__file__).parent / "fixtures"


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def forward(model, ids) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_forward(graphdef, state, jnp.asarray(ids)))


def _ids(name: str) -> np.ndarray:
    return np.load(FIXTURES / name / "expected.npz")["input_ids"]


@pytest.mark.parametrize(
    ("name", "targets"),
    [("gpt2", ("c_attn", "attn.c_proj", "mlp.c_fc")), ("llama", ("q_proj", "v_proj", "down_proj"))],
)
def test_zero_b_reproduces_base_exactly(name, targets):
    model = models.load(FIXTURES / name)
    base_logits = forward(model, _ids(name))
    paths = lora.add_lora(model, LoRAConfig(targets=targets, rank=4), key=jax.random.key(1))
    assert len(paths) == len(targets) * model.config.n_layers
    graphdef, adapters, base = lora.split(model)
    adapters = lora.init_adapters(adapters, jax.random.key(7))  # fresh A, B still zero
    merged = lora.merge(graphdef, adapters, base)
    np.testing.assert_array_equal(forward(merged, _ids(name)), base_logits)


def _numpy_linear(linear, x: np.ndarray) -> np.ndarray:
    w = np.asarray(linear.kernel[...], np.float64)
    y = x @ w
    if linear.bias is not None:
        y = y + np.asarray(linear.bias[...], np.float64)
    return y


def _set_random_b(module: lora.LoRA, seed: int) -> tuple[np.ndarray, np.ndarray]:
    b = np.random.default_rng(seed).normal(size=module.b[...].shape).astype(np.float32)
    module.b.set_value(jnp.asarray(b))
    return np.asarray(module.a[...], np.float64), b.astype(np.float64)


@pytest.mark.parametrize(
    ("scaling", "expected_scale"), [("alpha/r", 8.0 / 4), ("alpha/sqrt(r)", 8.0 / math.sqrt(4))]
)
def test_lora_matches_numpy_whole_projection(scaling, expected_scale):
    model = models.load(FIXTURES / "gpt2")
    cfg = LoRAConfig(targets=("c_attn",), rank=4, alpha=8.0, scaling=scaling)
    assert cfg.scale == pytest.approx(expected_scale)
    lora.add_lora(model, cfg, key=jax.random.key(0))
    linear = model.transformer.h[1].attn.c_attn
    a, b = _set_random_b(linear.lora, seed=1)
    chex.assert_shape([a, b], [(48, 4), (4, 144)])
    x = np.random.default_rng(2).normal(size=(2, 5, 48)).astype(np.float32)
    want = _numpy_linear(linear, x) + expected_scale * (x @ a @ b)
    got = np.asarray(linear(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert not np.allclose(got, _numpy_linear(linear, x), atol=1e-3)  # the delta is there


@pytest.mark.parametrize("scaling", ["alpha/r", "alpha/sqrt(r)"])
def test_fused_slice_lora_vs_whole_c_attn(scaling):
    d, r = 48, 4
    x = np.random.default_rng(3).normal(size=(2, 5, d)).astype(np.float32)
    sliced = models.load(FIXTURES / "gpt2")
    cfg = LoRAConfig(targets=("c_attn.q",), rank=r, alpha=16.0, scaling=scaling)
    assert lora.add_lora(sliced, cfg, key=jax.random.key(0)) == [
        "transformer.h.0.attn.c_attn.q",
        "transformer.h.1.attn.c_attn.q",
    ]
    linear = sliced.transformer.h[0].attn.c_attn
    assert getattr(linear, "lora", None) is None  # only the q slot is adapted
    a, b = _set_random_b(linear.lora_q, seed=4)
    chex.assert_shape(b, (r, d))
    want = _numpy_linear(linear, x)
    want[..., :d] += cfg.scale * (x @ a @ b)  # only the q columns move
    got = np.asarray(linear(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)

    # The same update expressed on the whole fused projection: B with zero k/v columns.
    whole = models.load(FIXTURES / "gpt2")
    lora.add_lora(whole, LoRAConfig(targets=("c_attn",), rank=r, alpha=16.0, scaling=scaling))
    wl = whole.transformer.h[0].attn.c_attn
    wl.lora.a.set_value(jnp.asarray(a, jnp.float32))
    wl.lora.b.set_value(jnp.concatenate([jnp.asarray(b, jnp.float32), jnp.zeros((r, 2 * d))], 1))
    np.testing.assert_allclose(np.asarray(wl(jnp.asarray(x))), got, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("init_fan", "fan"), [("in", 48), ("rank", 4)])
def test_kaiming_uniform_bounds(init_fan, fan):
    model = models.load(FIXTURES / "gpt2")
    cfg = LoRAConfig(targets=("mlp.c_fc",), rank=4, init_fan=init_fan)
    lora.add_lora(model, cfg, key=jax.random.key(3))
    bound = 1.0 / math.sqrt(fan)
    for block in model.transformer.h:
        a = np.asarray(block.mlp.c_fc.lora.a[...])
        chex.assert_shape(a, (48, 4))
        assert np.abs(a).max() <= bound
        assert np.abs(a).max() > 0.8 * bound  # 192 draws: the range is used
        np.testing.assert_array_equal(np.asarray(block.mlp.c_fc.lora.b[...]), 0.0)
    _, adapters, _ = lora.split(model)
    redrawn = lora.init_adapters(adapters, jax.random.key(11))
    for path, var in nnx.to_flat_state(redrawn):
        value = np.asarray(var.get_value())
        if path[-1] == "a":
            assert np.abs(value).max() <= bound
        else:
            np.testing.assert_array_equal(value, 0.0)


def test_per_client_and_shared_init():
    model = models.load(FIXTURES / "llama")
    lora.add_lora(model, LoRAConfig(targets=("q_proj", "v_proj"), rank=2))
    _, template, _ = lora.split(model)
    n = 3
    init = jax.vmap(lora.init_adapters, in_axes=(None, 0))
    independent = init(template, jax.random.split(jax.random.key(0), n))
    shared = init(template, jnp.stack([jax.random.key(5)] * n))
    chex.assert_tree_shape_prefix(independent, (n,))
    chex.assert_tree_shape_prefix(shared, (n,))
    chex.assert_trees_all_equal_shapes(jax.tree.map(lambda x: x[0], independent), template)
    for path, var in nnx.to_flat_state(independent):
        value = np.asarray(var.get_value())
        if path[-1] == "a":
            assert not np.array_equal(value[0], value[1])
            assert not np.array_equal(value[1], value[2])
        else:
            np.testing.assert_array_equal(value, 0.0)
    for _, var in nnx.to_flat_state(shared):
        value = np.asarray(var.get_value())
        np.testing.assert_array_equal(value[0], value[1])
        np.testing.assert_array_equal(value[0], value[2])
    # Same key → same draw, also outside vmap.
    chex.assert_trees_all_equal(
        lora.init_adapters(template, jax.random.key(5)), jax.tree.map(lambda x: x[0], shared)
    )


def test_target_matching_nothing_is_a_clear_error():
    model = models.load(FIXTURES / "gpt2")
    with pytest.raises(ValueError, match="q_proj") as err:
        lora.add_lora(model, LoRAConfig(targets=("q_proj",)))
    assert "c_attn" in str(err.value)  # lists what is available
    with pytest.raises(ValueError, match="both a fused projection and one of its slices"):
        lora.add_lora(model, LoRAConfig(targets=("c_attn", "c_attn.v")))


def test_detach_adapters_restores_the_bare_base():
    from fedjax_lora.models.factory import from_config
    from tests.tiny import CONFIG

    model = from_config(CONFIG)
    tokens = jnp.arange(10).reshape(1, 10) % CONFIG.vocab_size
    bare = np.asarray(model(tokens))
    lora.add_lora(model, lora.LoRAConfig(targets=("c_attn.q", "mlp.c_fc"), rank=2))
    lora.detach_adapters(model)
    _, adapters, _ = lora.split(model)
    assert not jax.tree.leaves(adapters)
    np.testing.assert_array_equal(np.asarray(model(tokens)), bare)
    lora.add_lora(model, lora.LoRAConfig(targets=("c_attn.v",), rank=2))  # slots usable again
