"""Generate the tiny Hugging Face checkpoints in `tests/fixtures/` with transformers + torch.

The test suite does not need torch; only this script does. Run it in a separate venv:

    python3 -m venv /tmp/fixvenv
    /tmp/fixvenv/bin/pip install torch==2.13.0 transformers safetensors numpy  # pinned torch!
    /tmp/fixvenv/bin/python scripts/make_fixtures.py [--out tests/fixtures]

Each `tests/fixtures/<name>/` holds `config.json`, `model.safetensors` (f32) and `expected.npz`
(`input_ids` int32 [B, T] and `logits` f32 [B, T, V] from transformers' PyTorch model in eval
mode). Fixtures: `gpt2` (fused c_attn, tied head), `llama` (GQA, Llama-3 rope scaling, untied
head), `qwen2` (GQA, q/k/v biases, tied head). All tiny: d <= 64, vocab <= 1k, 2 layers.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

SEED = 0
BATCH, SEQ = 2, 24


def _configs():
    gpt2 = transformers.GPT2Config(
        vocab_size=384,
        n_positions=64,
        n_embd=48,
        n_layer=2,
        n_head=4,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    llama = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        rope_theta=500.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    qwen2 = transformers.Qwen2Config(
        vocab_size=288,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return {
        "gpt2": (gpt2, transformers.GPT2LMHeadModel),
        "llama": (llama, transformers.LlamaForCausalLM),
        "qwen2": (qwen2, transformers.Qwen2ForCausalLM),
    }


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial values everywhere (biases and norm weights too), so loading bugs show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=generator))


def make(name: str, out: Path) -> None:
    config, cls = _configs()[name]
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED + sorted(_configs()).index(name))
    model = cls(config).eval()  # eval: dropout off
    _randomize(model, generator)
    if config.tie_word_embeddings:
        model.tie_weights()
    directory = out / name
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory, safe_serialization=True)
    for extra in directory.iterdir():  # keep config.json + model.safetensors only
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, config.vocab_size, size=(BATCH, SEQ)).astype(np.int32)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids).long()).logits.float().numpy()
    np.savez_compressed(directory / "expected.npz", input_ids=ids, logits=logits)
    for f in directory.iterdir():
        f.chmod(0o644)
    cfg = json.loads((directory / "config.json").read_text())
    size = sum(f.stat().st_size for f in directory.iterdir())
    print(f"{name}: model_type={cfg['model_type']} {size / 1024:.0f} KiB, logits {logits.shape}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests/fixtures")
    parser.add_argument("names", nargs="*", default=list(_configs()))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for name in args.names:
        make(name, args.out)


if __name__ == "__main__":
    main()
