"""Checkpoint loading: our logits vs transformers' (committed fixtures), bf16, GGUF, errors."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from fedjax_lora import models
from fedjax_lora.models import CheckpointError, ModelConfig, TokenizerMismatchError
from fedjax_lora.models.gguf import gguf_tokenizer, load_gguf, unpermute_qk
from fedjax_lora.models.weights import load_state_dict, read_safetensors

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ("gpt2", "llama", "qwen2")


def _expected(name: str):
    data = np.load(FIXTURES / name / "expected.npz")
    return data["input_ids"], data["logits"]


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def forward(model, ids) -> np.ndarray:
    """Jitted `model(ids)` (GraphDefs are hashable, so they can be static arguments)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_forward(graphdef, state, jnp.asarray(ids)))


def _max_diff(model, name: str) -> float:
    ids, expected = _expected(name)
    logits = forward(model, ids)
    chex.assert_shape(logits, expected.shape)
    return float(np.abs(logits - expected).max())


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_f32(name):
    model = models.load(FIXTURES / name)
    assert isinstance(model, nnx.Module)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert var.get_value().dtype == jnp.float32
    diff = _max_diff(model, name)
    print(f"{name}: max |logits - transformers| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_bf16_loading(name):
    model = models.load(str(FIXTURES / name), dtype=jnp.bfloat16)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert var.get_value().dtype == jnp.bfloat16
    ids, expected = _expected(name)
    logits = forward(model, ids)
    assert logits.dtype == np.float32
    diff = float(np.abs(logits - expected).max())
    print(f"{name} bf16: max |logits - transformers| = {diff:.2e}")
    assert diff < 0.1 * float(np.abs(expected).max())
    # Same argmax almost everywhere.
    agree = (logits.argmax(-1) == expected.argmax(-1)).mean()
    assert agree > 0.9


def test_configs_from_hf():
    gpt2 = models.load(FIXTURES / "gpt2").config
    assert (gpt2.family, gpt2.tie_embeddings, gpt2.qkv_bias) == ("gpt2", True, True)
    llama = models.load(FIXTURES / "llama").config
    assert llama.family == "llama" and not llama.tie_embeddings and llama.num_kv_heads == 2
    assert llama.rope_scaling["rope_type"] == "llama3"
    hash(llama)  # hashable, so GraphDefs can be static jit arguments
    qwen = models.load(FIXTURES / "qwen2").config
    assert qwen.qkv_bias and qwen.tie_embeddings and qwen.num_kv_heads == 1


def test_generate_compiles_once_and_is_greedy():
    model = models.load(FIXTURES / "qwen2")
    prompt = jnp.asarray([[5, 17, 42], [7, 7, 7]], jnp.int32)
    out = models.generate(model, prompt, 4)
    chex.assert_shape(out, (2, 7))
    np.testing.assert_array_equal(out[:, :3], prompt)
    # Greedy: each new token is the argmax given all tokens before it (causal model, so one
    # forward over the finished sequence gives every step's logits).
    logits = forward(model, out)
    np.testing.assert_array_equal(out[:, 3:], logits[:, 2:-1].argmax(-1))
    # A second call with the same shapes reuses the compiled program.
    from fedjax_lora.models.generate import _greedy

    before = _greedy._cache_size()
    models.generate(model, prompt + 1, 4)
    assert _greedy._cache_size() == before


def test_sharded_safetensors(tmp_path):
    from safetensors.numpy import save_file

    src = FIXTURES / "llama"
    state = read_safetensors(src)
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    assert _max_diff(models.load(tmp_path), "llama") < 1e-4


def _save_bf16_safetensors(state: dict[str, np.ndarray], path: Path) -> None:
    """Writes the safetensors layout by hand (safetensors.numpy cannot write bf16)."""
    header, chunks, offset = {}, [], 0
    for name in sorted(state):
        raw = np.ascontiguousarray(state[name].astype(ml_dtypes.bfloat16)).tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(state[name].shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(chunks))


def test_bf16_checkpoint(tmp_path):
    """Real HF checkpoints are often stored in bf16, which numpy cannot name without ml_dtypes."""
    state = read_safetensors(FIXTURES / "qwen2")
    _save_bf16_safetensors(state, tmp_path / "model.safetensors")
    shutil.copy(FIXTURES / "qwen2" / "config.json", tmp_path / "config.json")
    loaded = read_safetensors(tmp_path)
    assert loaded["model.norm.weight"].dtype == ml_dtypes.bfloat16
    want = state["model.norm.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(loaded["model.norm.weight"].astype(np.float32), want)
    model = models.load(tmp_path)  # f32 model from bf16 weights
    ids, expected = _expected("qwen2")
    diff = float(np.abs(forward(model, ids) - expected).max())
    assert 0 < diff < 0.1 * float(np.abs(expected).max())


def test_bare_gpt2_names_without_prefix():
    """The hub's `gpt2` checkpoint names tensors without `transformer.`; buffers are ignored."""
    state = read_safetensors(FIXTURES / "gpt2")
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # causal-mask buffer
    bare["lm_head.weight"] = state["transformer.wte.weight"]  # tied: skipped
    cfg = models.load(FIXTURES / "gpt2").config
    model = load_state_dict(models.build(cfg), bare)
    assert _max_diff(model, "gpt2") < 1e-4


def test_missing_unexpected_and_mismatched_tensors_are_named():
    cfg = models.load(FIXTURES / "llama").config
    state = read_safetensors(FIXTURES / "llama")
    broken = dict(state)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    broken["model.norm.weight"] = np.ones((7,), np.float32)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(models.build(cfg), broken)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg
    assert "model.layers.0.self_attn.extra.weight" in msg and "unexpected" in msg
    assert "model.norm.weight" in msg and "(7,)" in msg


def test_untied_head_needs_lm_head():
    cfg = models.load(FIXTURES / "llama").config
    state = read_safetensors(FIXTURES / "llama")
    del state["lm_head.weight"]
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_state_dict(models.build(cfg), state)


def test_from_config_random_init():
    cfg = ModelConfig(
        family="llama", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48,
        max_positions=16,
    )  # fmt: skip
    model = models.from_config(cfg, seed=1)
    logits = forward(model, np.zeros((1, 5), np.int32))
    chex.assert_shape(logits, (1, 5, 64))
    chex.assert_tree_all_finite(logits)


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        models.load(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="config.json"):
        models.load(tmp_path)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        models.load(tmp_path / "missing.gguf")


def test_missing_weights(tmp_path):
    shutil.copy(FIXTURES / "gpt2" / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        models.load(tmp_path)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(ValueError, match="bert") as err:
        models.load(tmp_path)
    for supported in ("gpt2", "llama", "qwen2"):
        assert supported in str(err.value)


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoint_refused(tmp_path, filename):
    shutil.copy(FIXTURES / "gpt2" / "config.json", tmp_path / "config.json")
    (tmp_path / filename).write_bytes(b"\x80\x04not really a pickle")
    for target in (tmp_path, tmp_path / filename):
        with pytest.raises(CheckpointError, match="safe_serialization=True") as err:
            models.load(target)
        assert "pickle" in str(err.value)


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        models.load("some-org/not-a-cached-model")


# ---------------------------------------------------------------------------------------------
# Tokenizers


def _word_tokenizer(n: int):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, n)}}
    tok = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_tokenizer_vocab_must_fit_model():
    cfg = models.load(FIXTURES / "gpt2").config  # vocab 384
    models.check_vocab(_word_tokenizer(384), cfg)
    models.check_vocab(_word_tokenizer(100), cfg)  # a padded embedding table is fine
    with pytest.raises(TokenizerMismatchError, match="vocab_size=384"):
        models.check_vocab(_word_tokenizer(500), cfg)


def test_load_tokenizer_from_hf_dir(tmp_path):
    _word_tokenizer(50).save_pretrained(tmp_path)
    tok = models.load_tokenizer(tmp_path)
    assert tok("w3 w7")["input_ids"] == [3, 7]
    with pytest.raises(CheckpointError):
        models.load_tokenizer(tmp_path / "nope")
    # A checkpoint with config.json but no vocabulary files: transformers would build an empty
    # GPT-2 tokenizer that turns every text into no tokens; refused instead.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="has no vocabulary"):
        models.load_tokenizer(bare)


# ---------------------------------------------------------------------------------------------
# GGUF: write our fixtures the way llama.cpp's convert_hf_to_gguf.py does, read them back.


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's `LlamaModel.permute` (half-split rows → interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).normal(size=(4 * 16, 8)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(_permute(w, 4), 4), w)
    b = np.arange(32, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(_permute(b, 2), 2), b)


_BYTE_CHARS = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
]


def _byte_level_alphabet() -> list[str]:
    """GPT-2's `bytes_to_unicode` table (256 printable stand-ins for the bytes)."""
    bs, cs, n = list(_BYTE_CHARS), list(_BYTE_CHARS), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _write_tokenizer(writer, vocab_size: int) -> list[str]:
    import gguf

    tokens = ["<|endoftext|>", *_byte_level_alphabet(), "he", "ll", "hell", "hello", "Ġw", "Ġwo"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]
    tokens += [f"<pad{i}>" for i in range(vocab_size - len(tokens))]
    types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    return tokens


def _write_gguf(name: str, path: Path) -> ModelConfig:
    import gguf

    cfg = models.load(FIXTURES / name).config
    state = read_safetensors(FIXTURES / name)
    arch = "gpt2" if cfg.family == "gpt2" else ("qwen2" if cfg.qkv_bias else "llama")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    if cfg.family == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        top = {
            "transformer.wte.weight": "token_embd.weight",
            "transformer.wpe.weight": "position_embd.weight",
            "transformer.ln_f.weight": "output_norm.weight",
            "transformer.ln_f.bias": "output_norm.bias",
        }
        block = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv"}
        block |= {"attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        prefix = "transformer.h."
    else:
        w.add_head_count_kv(cfg.num_kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.dim_per_head)
        top = {
            "model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight",
        }
        block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
        for proj, short in [
            ("q", "attn_q"),
            ("k", "attn_k"),
            ("v", "attn_v"),
            ("o", "attn_output"),
        ]:
            block[f"self_attn.{proj}_proj"] = short
        for proj in ("gate", "up", "down"):
            block[f"mlp.{proj}_proj"] = f"ffn_{proj}"
        prefix = "model.layers."
    tokens = _write_tokenizer(w, cfg.vocab_size)
    assert len(tokens) == cfg.vocab_size
    for hf, value in sorted(state.items()):
        if hf.endswith(("attn.bias", "attn.masked_bias")) and "c_attn" not in hf:
            continue
        if hf in top:
            name = top[hf]
        else:
            rest = hf.removeprefix(prefix)
            layer, module_kind = rest.split(".", 1)
            module, kind = module_kind.rsplit(".", 1)
            name = f"blk.{layer}.{block[module]}.{kind}"
        value = np.asarray(value, np.float32)
        if cfg.family == "gpt2" and value.ndim == 2 and name.startswith("blk."):
            value = value.T  # Conv1D (in, out) -> (out, in)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            value = _permute(value, cfg.n_heads if ".attn_q." in name else cfg.num_kv_heads)
        w.add_tensor(name, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg


@pytest.mark.parametrize("name", ["gpt2", "qwen2", "llama"])
def test_gguf_round_trip(tmp_path, name):
    path = tmp_path / f"{name}.gguf"
    cfg = _write_gguf(name, path)
    model = models.load(path)
    got = model.config
    assert (got.family, got.vocab_size, got.d_model, got.n_layers) == (
        cfg.family, cfg.vocab_size, cfg.d_model, cfg.n_layers,
    )  # fmt: skip
    assert (got.num_kv_heads, got.tie_embeddings, got.qkv_bias) == (
        cfg.num_kv_heads, cfg.tie_embeddings, cfg.qkv_bias,
    )  # fmt: skip
    if name == "llama":
        # GGUF has no Llama-3 rope-scaling keys: compare with the HF weights without scaling.
        ref = load_state_dict(
            models.build(cfg.replace(rope_scaling=None)), read_safetensors(FIXTURES / name)
        )
        ids, _ = _expected(name)
        np.testing.assert_allclose(forward(model, ids), forward(ref, ids), atol=1e-5, rtol=0)
    else:
        assert _max_diff(model, name) < 1e-4
    bf16 = load_gguf(path, dtype=jnp.bfloat16)
    assert jax.tree.leaves(nnx.state(bf16, nnx.Param))[0].dtype == jnp.bfloat16


def test_gguf_tokenizer_byte_level_bpe(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_gguf("gpt2", path)
    tok = gguf_tokenizer(path)
    assert len(tok) == 384
    ids = tok("hello world")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġwo", "r", "l", "d"]
    assert tok.decode(ids) == "hello world"
    assert tok("<|endoftext|>x")["input_ids"][0] == 0  # control token matched whole
    assert tok.eos_token == "<|endoftext|>"
    assert models.load_tokenizer(path).get_vocab() == tok.get_vocab()
    models.check_vocab(tok, models.load(path).config)
    with pytest.raises(TokenizerMismatchError):
        models.check_vocab(tok, models.load(FIXTURES / "qwen2").config)  # vocab 288 < 384


def test_config_overrides_set_dropout_which_is_off_without_rngs():
    model = models.load(FIXTURES / "gpt2", dropout=0.2, attn_dropout=0.2)
    assert model.config.dropout == 0.2 and model.config.attn_dropout == 0.2
    ids, expected = _expected("gpt2")
    assert _max_diff(model, "gpt2") < 1e-4  # evaluation: no rngs, no dropout
    noisy = np.asarray(model(jnp.asarray(ids), rngs=nnx.Rngs(dropout=0)))
    assert np.abs(noisy - expected).max() > 1e-2


def test_exact_erf_gelu_option_changes_the_mlp_only_slightly():
    exact = models.load(FIXTURES / "gpt2", activation="gelu_erf")
    assert exact.config.activation == "gelu_erf"
    ids, expected = _expected("gpt2")
    diff = np.abs(forward(exact, ids) - expected).max()
    assert 0 < diff < 0.1  # tanh-approximate vs exact GELU differ by < 1e-3 per unit
