"""Fuzzing the inputs a careless user or a hostile file gives (issue 15): mutated safetensors
files, sharded indexes, config.json, GGUF files, YAML configs, `--set` values and checkpoints.
Every case must end in a project error (`FedjaxLoraError`, one line naming the file or field) or
a correct result (the same weights or state as the intact input); never a traceback of another
error type and never a silently different result. Seeded, a bounded number of cases per input
kind, a few seconds in all."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lora import config as config_lib
from fedjax_lora import models
from fedjax_lora.errors import FedjaxLoraError
from tests.test_models import FIXTURES, _write_gguf

RNG_SEED = 15


def _params(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


class Tally:
    """Outcomes of one input kind: clear error, correct result, traceback, silent wrong."""

    def __init__(self, kind: str):
        self.kind, self.counts, self.examples = kind, collections.Counter(), []

    def run(self, case: str, attempt, correct, names: str) -> None:
        """`attempt()` must raise a one-line `FedjaxLoraError` mentioning `names`, or return a
        result for which `correct(result)` holds."""
        try:
            result = attempt()
        except FedjaxLoraError as e:
            ok = "\n" not in str(e) and names in str(e)
            self.counts["clear" if ok else "unclear"] += 1
            if not ok:
                self.examples.append(f"{case}: {e}")
            return
        except Exception as e:  # noqa: BLE001 - what the fuzz is looking for
            self.counts["traceback"] += 1
            self.examples.append(f"{case}: {type(e).__name__}: {e}")
            return
        if correct(result):
            self.counts["correct"] += 1
        else:
            self.counts["silent"] += 1
            self.examples.append(f"{case}: loaded a different result")

    def check(self) -> None:
        tried = sum(self.counts.values())
        print(f"\nfuzz {self.kind}: tried {tried}, {dict(self.counts)}")
        bad = self.counts["traceback"] + self.counts["silent"] + self.counts["unclear"]
        assert bad == 0, self.examples[:10]


@pytest.fixture(scope="module")
def gpt2_reference():
    return _params(models.load(FIXTURES / "gpt2"))


def _same(reference):
    def same(model):
        got = _params(model)
        return got.keys() == reference.keys() and all(
            np.array_equal(got[k], reference[k]) for k in got
        )

    return same


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


def _with_header(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)


def test_fuzz_safetensors(tmp_path, gpt2_reference):
    tally, rng = Tally("safetensors"), np.random.default_rng(RNG_SEED)
    source = FIXTURES / "gpt2"
    raw = (source / "model.safetensors").read_bytes()
    n, header = _header(source / "model.safetensors")
    body = raw[8 + n :]
    names = [k for k in header if k != "__metadata__"]

    def case(label, write):
        d = tmp_path / f"c{sum(tally.counts.values())}"
        shutil.copytree(source, d)
        write(d / "model.safetensors")
        tally.run(label, lambda: models.load(d), _same(gpt2_reference), d.name)

    for cut in rng.integers(0, len(raw), 12).tolist() + [0, 4, 8, 8 + n // 2]:
        case(f"truncated at {cut}", lambda p, cut=cut: p.write_bytes(raw[:cut]))
    for pos in rng.integers(8, 8 + n, 24).tolist():  # header bytes (JSON, names, shapes, offsets)
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << int(rng.integers(0, 7))
        case(f"header bit at {pos}", lambda p, b=bytes(flipped): p.write_bytes(b))
    for dtype in ("I32", "U8", "BOOL", "I64", "F16", "F64", "XX"):
        name = names[int(rng.integers(len(names)))]
        h = json.loads(json.dumps(header))
        h[name]["dtype"] = dtype
        case(f"{name} as {dtype}", lambda p, h=h: _with_header(p, h, body))
    for label, edit in [
        (
            "shifted offsets",
            lambda h, k: h[k].update(data_offsets=[o + 4 for o in h[k]["data_offsets"]]),
        ),
        ("aliased offsets", lambda h, k: h[k].update(data_offsets=h[names[0]]["data_offsets"])),
        ("negative shape", lambda h, k: h[k].update(shape=[-1])),
        ("header not a mapping", lambda h, k: h.clear() or h.update({k: []})),
    ]:
        for name in names[1:4]:
            h = json.loads(json.dumps(header))
            edit(h, name)
            case(f"{label} {name}", lambda p, h=h: _with_header(p, h, body))
    for value in (np.nan, np.inf):  # a non-finite weight inside an intact file
        start = header[names[0]]["data_offsets"][0]
        poisoned = bytearray(body)
        poisoned[start : start + 4] = np.float32(value).tobytes()
        case(f"{value} weight", lambda p, b=bytes(poisoned): _with_header(p, header, b))
    tally.check()


def test_fuzz_sharded_index(tmp_path, gpt2_reference):
    from safetensors.numpy import save_file

    tally = Tally("sharded index")
    state = models.weights.read_safetensors(FIXTURES / "gpt2")
    names = sorted(state)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}

    def case(label, weight_map=None, index_text=None, extra=None):
        d = tmp_path / f"c{sum(tally.counts.values())}"
        d.mkdir()
        shutil.copy(FIXTURES / "gpt2" / "config.json", d)
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys} | (extra or {}).get(shard, {}), d / shard)
        if weight_map is None:
            weight_map = {k: s for s, keys in shards.items() for k in keys}
        text = index_text if index_text is not None else json.dumps({"weight_map": weight_map})
        (d / "model.safetensors.index.json").write_text(text)
        (tmp_path / "outside.safetensors").write_bytes(
            (FIXTURES / "gpt2" / "model.safetensors").read_bytes()
        )
        tally.run(label, lambda: models.load(d), _same(gpt2_reference), "safetensors")

    good = {k: s for s, keys in shards.items() for k in keys}
    case("intact")
    case("traversal", {**good, names[0]: "../outside.safetensors"})
    case("absolute", {**good, names[0]: "/etc/passwd"})
    case("absolute sibling", {**good, names[0]: str(tmp_path / "outside.safetensors")})
    case("missing shard", {**good, names[0]: "c.safetensors"})
    case("tensor in two shards", extra={"b.safetensors": {names[0]: state[names[0]] + 1}})
    case("wrong shard named", {**good, names[0]: "b.safetensors"})
    case("map lists an absent tensor", {**good, "transformer.h.9.ln_1.weight": "a.safetensors"})
    for text in (
        "",
        "[]",
        "null",
        '{"weight_map": []}',
        '{"weight_map": {"x": 1}}',
        "{",
        '{"a": 1}',
    ):
        case(f"index {text!r}", index_text=text)
    tally.check()


def test_fuzz_config_json(tmp_path, gpt2_reference):
    tally = Tally("config.json")
    config = json.loads((FIXTURES / "gpt2" / "config.json").read_text())

    def case(label, text):
        d = tmp_path / f"c{sum(tally.counts.values())}"
        shutil.copytree(FIXTURES / "gpt2", d)
        (d / "config.json").write_text(text)
        tally.run(label, lambda: models.load(d), _same(gpt2_reference), d.name)

    for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "model_type"):
        case(f"no {key}", json.dumps({k: v for k, v in config.items() if k != key}))
        for value in (0, -1, None, "x", [], 2.5, 10**6):
            case(f"{key}={value!r}", json.dumps({**config, key: value}))
    for text in ("[]", "null", "", "{", '"gpt2"', "1"):
        case(f"file {text!r}", text)
    tally.check()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "gpt2.gguf"
    _write_gguf("gpt2", path)
    return path, _params(models.load(path))


def test_fuzz_gguf(tmp_path, gguf_file):
    import gguf

    path, reference = gguf_file
    tally, rng = Tally("gguf"), np.random.default_rng(RNG_SEED)
    raw = path.read_bytes()
    reader = gguf.GGUFReader(path)
    data_start = min(int(t.data_offset) for t in reader.tensors)

    def case(label, data):
        p = tmp_path / f"c{sum(tally.counts.values())}.gguf"
        p.write_bytes(data)
        tally.run(label, lambda: models.load(p), _same(reference), p.name)

    for cut in rng.integers(0, len(raw), 10).tolist() + [0, 3, 24, data_start]:
        case(f"truncated at {cut}", raw[:cut])
    for pos in rng.integers(0, data_start, 40).tolist():  # metadata, counts, types, offsets
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << int(rng.integers(0, 7))
        case(f"header bit at {pos}", bytes(flipped))
    for value in (np.nan, np.inf):
        poisoned = bytearray(raw)
        t = reader.tensors[0]
        poisoned[int(t.data_offset) : int(t.data_offset) + 4] = np.float32(value).tobytes()
        case(f"{value} weight", bytes(poisoned))
    tally.check()


FIELDS = [
    "rounds",
    "seed",
    "optimizer.lr",
    "optimizer.b2",
    "lora.rank",
    "lora.alpha",
    "model.n_heads",
    "data.val_fraction",
    "training.steps",
    "trust.temperature",
    "lora.targets",
    "methods",
    "data.source",
    "tracking.progress",
    "nosuch.field",
]
VALUES = [
    "0",
    "-1",
    ".nan",
    ".inf",
    "1e309",
    "2.5",
    "true",
    "[]",
    "{}",
    "x",
    "'1'",
    "null",
    "1180591620717411303424",
    "[1, 2",
    "!!python/object/apply:os.system [echo hi]",
    "",
]


def test_fuzz_set_values_and_yaml(tmp_path):
    tally, rng = Tally("--set and YAML"), np.random.default_rng(RNG_SEED)

    def valid(config):  # what loaded must pass every range check (re-checked independently)
        config_lib.check_ranges(config)
        return True

    for field in FIELDS:
        for value in VALUES:
            item = f"{field}={value}"
            tally.run(
                item, lambda item=item: config_lib.load(None, [item]), valid, field.split(".")[0]
            )
    text = "rounds: 3\nmethods: [local, fedavg]\noptimizer:\n  lr: 0.01\nlora:\n  rank: 4\n"
    for i in range(60):
        chars = list(text)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(len(chars)))
            if rng.random() < 0.5:
                del chars[pos]
            else:
                chars.insert(pos, "[]{}:-!&*#'\"\t\n 9.x"[int(rng.integers(18))])
        p = tmp_path / f"c{i}.yaml"
        p.write_text("".join(chars))
        tally.run(f"yaml {i}", lambda p=p: config_lib.load(p), valid, "")
    tally.check()


def test_fuzz_checkpoint_bytes(tmp_path):
    from fedjax_lora.checkpoint import Checkpointer

    tally, rng = Tally("checkpoint"), np.random.default_rng(RNG_SEED)
    states = {r: {"w": jnp.arange(64.0) * r, "key": jax.random.key(r)} for r in (1, 2)}
    base = tmp_path / "base"
    ckpt = Checkpointer(base, keep=3)
    for r, state in states.items():
        ckpt.save(r, state, [{"round": r}])
    ckpt.close()
    files = sorted(p for p in (base / "2").rglob("*") if p.is_file())

    def exact(result):  # the newest intact checkpoint, bit for bit, or nothing at all
        if result is None:
            return True
        step, state, records = result
        want = states[step]
        return (
            records == [{"round": step}]
            and np.array_equal(state["w"], want["w"])
            and (
                np.array_equal(jax.random.key_data(state["key"]), jax.random.key_data(want["key"]))
            )
        )

    for i in range(24):
        d = tmp_path / f"c{i}"
        shutil.copytree(base, d)
        f = d / files[i % len(files)].relative_to(base)
        data = bytearray(f.read_bytes())
        if data and rng.random() < 0.7:
            data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(0, 7))
        else:
            data = data[: len(data) // 2]
        f.write_bytes(bytes(data))

        def restore(d=d):
            c = Checkpointer(d, keep=3)
            try:
                return c.restore_latest(states[1])
            finally:
                c.close()

        tally.run(f"{f.name} #{i}", restore, exact, "checkpoint")
    tally.check()


def test_fuzz_token_stream_sidecars(tmp_path):
    from fedjax_lora.data.streams import open_stream, sidecar_path, write_stream

    tally = Tally("token streams")
    tokens = np.arange(1000) % 300
    path = write_stream(tmp_path / "s.bin", tokens, vocab_size=300)
    meta = json.loads(sidecar_path(path).read_text())
    variants = ["", "{", "[]", "null", json.dumps({**meta, "dtype": "float32"})]
    variants += [json.dumps({k: v for k, v in meta.items() if k != key}) for key in meta]
    for value in (-1, 10**6, "x", None, 2.5, True):
        variants += [json.dumps({**meta, "length": value}), json.dumps({**meta, "dtype": value})]
    for i, text in enumerate(variants):
        sidecar_path(path).write_text(text)

        def correct(stream):
            return np.array_equal(np.asarray(stream), tokens)

        tally.run(f"sidecar {i}: {text}", lambda: open_stream(path), correct, "s.bin")
    tally.check()


def test_fuzz_tokenizer_files(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tally, rng = Tally("tokenizer files"), np.random.default_rng(RNG_SEED)
    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "fuzz", "!"])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    source = tmp_path / "source"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(source)
    text = "hello world fuzz !"
    want = [1, 2, 3, 4]
    raw = (source / "tokenizer.json").read_bytes()

    def case(label, data):
        d = tmp_path / f"c{sum(tally.counts.values())}"
        shutil.copytree(source, d)
        (d / "tokenizer.json").write_bytes(data)

        def correct(t):
            return t(text, add_special_tokens=False)["input_ids"] == want

        tally.run(label, lambda: models.load_tokenizer(d), correct, d.name)

    for cut in rng.integers(0, len(raw), 12).tolist() + [0, 1]:
        case(f"truncated at {cut}", raw[:cut])
    for pos in rng.integers(0, len(raw), 24).tolist():
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << int(rng.integers(0, 7))
        case(f"bit at {pos}", bytes(flipped))
    tally.check()
