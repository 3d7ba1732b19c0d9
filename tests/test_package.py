"""The package surface: `import fedjax_lora` reaches every public subpackage (lazily), and the
JAX-free modules stay JAX-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_subpackages_load_on_attribute_access():
    import fedjax_lora

    assert callable(fedjax_lora.models.load)
    assert callable(fedjax_lora.aggregation.fedavg_aggregator)
    assert callable(fedjax_lora.algorithms.get_method)
    assert callable(fedjax_lora.lora.add_lora)
    assert callable(fedjax_lora.engine.map_clients)
    assert callable(fedjax_lora.data.dirichlet)
    assert callable(fedjax_lora.config.load)
    assert set(fedjax_lora.SUBMODULES) <= set(dir(fedjax_lora))
    missing = [name for name in fedjax_lora.SUBMODULES if not hasattr(fedjax_lora, name)]
    assert missing == []


def test_unknown_attribute_is_an_attribute_error():
    import fedjax_lora

    try:
        fedjax_lora.no_such_module  # noqa: B018
    except AttributeError as e:
        assert "no_such_module" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_package_and_config_import_without_jax():
    """The CLI checks configs before JAX loads: neither the package nor its JAX-free modules
    (config, settings, families, typing, presets, errors) may import JAX, optax or flax."""
    code = (
        "import sys, fedjax_lora, fedjax_lora.config, fedjax_lora.families, fedjax_lora.typing\n"
        "print(sorted({'jax', 'optax', 'flax', 'jaxtyping'} & set(sys.modules)))"
    )
    assert _run(code) == "[]"


def test_family_specs_match_the_models_they_describe():
    """Each spec's names are the ones its model and transformers use: every GGUF target and the
    embedding exist among the built model's HF names, and `config.json` round-trips."""
    import json

    from fedjax_lora.export import hf_config
    from fedjax_lora.families import FAMILIES, family, family_of_gguf, family_of_hf
    from fedjax_lora.models import ModelConfig, build
    from fedjax_lora.models.weights import hf_param_names

    for name, spec in FAMILIES.items():
        assert family(name) is spec
        assert all(family_of_hf(t) is spec for t in spec.hf_model_types)
        assert all(family_of_gguf(a) is spec for a in spec.gguf_architectures)
        cfg = ModelConfig(
            family=name,
            vocab_size=16,
            d_model=8,
            n_layers=1,
            n_heads=2,
            d_ff=16,
            max_positions=8,
            qkv_bias=name == "gpt2",  # GPT-2 always has q/k/v biases
        )
        names = set(hf_param_names(build(cfg)))
        assert spec.backbone_prefix + spec.embedding in names
        top = {n for n in spec.gguf_names.values() if n != "lm_head.weight"}
        block = {f"{spec.gguf_block_prefix}.0.{m}.weight" for m in spec.gguf_block.values()}
        assert top | block <= names
        modules = {n.rsplit(".", 1)[0] for n in names}
        for target in spec.amole_targets + spec.lora_targets:
            base = target.removesuffix(".q").removesuffix(".v")
            assert any(m.endswith(base) for m in modules), (name, target)
        written = json.loads(json.dumps(hf_config(cfg)))
        read = ModelConfig.from_hf(written)
        assert (read.d_model, read.n_layers, read.d_ff, read.max_positions) == (8, 1, 16, 8)
        assert hf_config(read) == written
    try:
        family("gpt3")
    except ValueError as e:
        assert "'gpt2', 'llama'" in str(e)
    else:
        raise AssertionError("expected ValueError")
