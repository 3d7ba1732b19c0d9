"""Shared, framework-free helpers of the FedAMoLE parity harness (imports neither torch nor jax).

Both sides (the reference in its torch venv, fedjax_lora in its jax venv) import this module to
get the same paths, the same sizes and the same deterministic NumPy inputs (weights, held-expert
sets, token batches), so every comparison starts from bit-identical data.

Environment:
  REF_DIR  the exported reference repo (zyc140345/FedAMoLE), put on sys.path by `ref_path()`
  OUT_DIR  where fixtures and results go (default: ./parity_out under the working directory)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# Tiny Llama of the parity tests: GQA like Llama-3.2 (4 query heads, 2 kv heads), tied head.
PARITY_MODEL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    initializer_range=0.1,
)
# Tiny Llama of the speed test (the brief: 4 layers, d=128, vocab 8192).
SPEED_MODEL = dict(
    vocab_size=8192,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    initializer_range=0.05,
)
RANK, ALPHA, TOP_K, LB_COEF = 8, 16.0, 2, 1e-3
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "[PAD]")


def out_dir() -> Path:
    p = Path(os.environ.get("OUT_DIR", "parity_out")).resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def fixtures() -> Path:
    p = out_dir() / "fixtures"
    p.mkdir(parents=True, exist_ok=True)
    return p


def results() -> Path:
    p = out_dir() / "results"
    p.mkdir(parents=True, exist_ok=True)
    return p


def ref_path() -> Path:
    """The reference checkout (REF_DIR), prepended to sys.path so `import node` etc. work."""
    ref = os.environ.get("REF_DIR")
    if not ref or not (Path(ref) / "node.py").is_file():
        raise SystemExit("set REF_DIR to an export of zyc140345/FedAMoLE (node.py at its root)")
    ref = str(Path(ref).resolve())
    if ref not in sys.path:
        sys.path.insert(0, ref)
    return Path(ref)


def save_json(name: str, obj) -> Path:
    path = results() / name
    path.write_text(json.dumps(obj, indent=1, default=_jsonable))
    return path


def load_json(name: str):
    return json.loads((results() / name).read_text())


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


def save_npz(name: str, **arrays) -> Path:
    path = results() / name
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def load_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(results() / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------------------
# Module naming. The reference names a PEFT lora.Linear by its HF path
# ("model.layers.0.self_attn.q_proj"); fedjax_lora names the adapter slot inside it
# ("...q_proj.lora").


def module_names(num_layers: int) -> list[str]:
    return [
        f"model.layers.{i}.self_attn.{p}" for i in range(num_layers) for p in ("q_proj", "v_proj")
    ]


def module_dims(cfg: dict, name: str) -> tuple[int, int]:
    d = cfg["hidden_size"]
    head = d // cfg["num_attention_heads"]
    return (d, d) if name.endswith("q_proj") else (d, cfg["num_key_value_heads"] * head)


# ---------------------------------------------------------------------------------------------
# Deterministic inputs (torch layout: A [r, in], B [out, r], W_tok [r, in]).


def random_pool(rng: np.random.Generator, d_in: int, d_out: int, num_experts: int, b_std=0.2):
    """One module's expert pool with every factor non-zero (so every path carries signal):
    A ~ U(±1/√in) like PEFT, B ~ N(0, b_std) (PEFT would start at 0), W_tok ~ U(±1/√in) like
    nn.Linear; shared expert likewise."""
    bound = 1.0 / np.sqrt(d_in)
    f32 = np.float32
    return dict(
        A=rng.uniform(-bound, bound, (num_experts, RANK, d_in)).astype(f32),
        B=rng.normal(0, b_std, (num_experts, d_out, RANK)).astype(f32),
        W=rng.uniform(-bound, bound, (RANK, d_in)).astype(f32) * 3.0,
        sA=rng.uniform(-bound, bound, (RANK, d_in)).astype(f32),
        sB=rng.normal(0, b_std, (d_out, RANK)).astype(f32),
    )


def perturb(rng: np.random.Generator, pool: dict, scale=0.05) -> dict:
    """A client's local copy of a pool (the pool plus a small random change, as after training)."""
    return {
        k: (v + scale * np.std(v) * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in pool.items()
    }


def random_assignment(rng: np.random.Generator, num_experts, num_clients, k, lo, hi) -> np.ndarray:
    """A random feasible `bool [E, C]` (rows sum to k, column sums in [lo, hi]) by rejection."""
    for _ in range(100000):
        x = np.zeros((num_experts, num_clients), bool)
        for e in range(num_experts):
            x[e, rng.choice(num_clients, k, replace=False)] = True
        load = x.sum(0)
        if load.min() >= lo and load.max() <= hi:
            return x
    raise RuntimeError("no feasible assignment found")


def random_held(rng: np.random.Generator, num_experts: int, size: int) -> np.ndarray:
    held = np.zeros(num_experts, bool)
    held[rng.choice(num_experts, size, replace=False)] = True
    return held


def to_list_of_arrays(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def pack(parts) -> tuple[np.ndarray, np.ndarray]:
    parts = [np.asarray(p, np.int64) for p in parts]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return flat, offsets


# ---------------------------------------------------------------------------------------------
# Synthetic instruction data (Dolly-shaped and SNLI-shaped rows), deterministic.

WORDS = [
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "river",
    "stone",
    "cloud",
    "bird",
    "fish",
    "apple",
    "bread",
    "house",
    "road",
    "light",
    "night",
    "green",
    "blue",
    "red",
    "small",
    "large",
    "quick",
    "slow",
    "happy",
    "old",
    "new",
    "river.",
    "city,",
    "north",
    "south",
    "east",
    "west",
]
DOLLY_CATEGORIES = {  # the real Dolly-15k category sizes (15,011 rows)
    "open_qa": 3742,
    "general_qa": 2191,
    "classification": 2136,
    "closed_qa": 1773,
    "brainstorming": 1766,
    "information_extraction": 1506,
    "summarization": 1188,
    "creative_writing": 709,
}


def _sentence(rng, lo, hi) -> str:
    n = int(rng.integers(lo, hi))
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n)]
    s = " ".join(words)
    return s[0].upper() + s[1:]


def dolly_rows(n: int | None = None, seed: int = 0) -> list[dict]:
    """Dolly-shaped rows with the real category mix (shuffled); about a third have a context, a
    few are long enough to hit the fixture model's 256-token limit."""
    rng = np.random.default_rng(seed)
    cats = [c for c, k in DOLLY_CATEGORIES.items() for _ in range(k)]
    cats = [cats[i] for i in rng.permutation(len(cats))]
    if n is not None:
        cats = cats[:n]
    rows = []
    for i, c in enumerate(cats):
        long = i % 97 == 5
        rows.append(
            dict(
                instruction=_sentence(rng, 3, 12) + "?",
                context=_sentence(rng, 5, 300 if long else 30) + "." if i % 3 == 0 else "",
                response=_sentence(rng, 1, 200 if long else 25) + ".",
                category=c,
            )
        )
    return rows


def snli_rows(n: int = 6000, seed: int = 1, no_label_every: int = 500) -> list[dict]:
    """SNLI-shaped rows: labels 0/1/2 and, every `no_label_every`-th row, -1 (no gold label)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = -1 if i % no_label_every == 7 else int(rng.integers(0, 3))
        rows.append(
            dict(premise=_sentence(rng, 4, 15) + ".", hypothesis=_sentence(rng, 3, 8), label=label)
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# ROUGE test pairs: (hypothesis, reference) texts, identical on both sides.


ROUGE_KINDS = (
    "identical",
    "dropped words",
    "lowercased",
    "punctuation",
    "shuffled",
    "unrelated",
    "prefix",
)


def rouge_pairs(seed: int = 3, n: int = 350) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        ref = " ".join(_sentence(rng, 3, 25) + "." for _ in range(int(rng.integers(1, 4))))
        words = ref.split()
        kind = i % len(ROUGE_KINDS)
        if kind == 0:
            hyp = ref  # identical
        elif kind == 1:  # dropped words
            keep = rng.random(len(words)) > 0.3
            hyp = " ".join(w for w, k in zip(words, keep, strict=True) if k) or words[0]
        elif kind == 2:  # case changed
            hyp = ref.lower()
        elif kind == 3:  # punctuation detached / removed
            hyp = ref.replace(".", " .").replace(",", "")
        elif kind == 4:  # shuffled
            hyp = " ".join(words[j] for j in rng.permutation(len(words)))
        elif kind == 5:  # unrelated text
            hyp = _sentence(rng, 3, 20)
        else:  # a prefix (a generation cut by max_new_tokens), mid-sentence
            hyp = " ".join(words[: max(1, int(len(words) * 0.6))])
        pairs.append((hyp, ref))
    return pairs


# ---------------------------------------------------------------------------------------------
# Test cases shared by both sides.

LAYER_E = 6  # pool size of the layer/model tests


def model_pools(cfg: dict, num_experts: int, seed: int) -> dict[str, dict]:
    """A random pool for every q/v module of the model (torch layout)."""
    rng = np.random.default_rng(seed)
    return {
        name: random_pool(rng, *module_dims(cfg, name), num_experts)
        for name in module_names(cfg["num_hidden_layers"])
    }


def layer_cases() -> list[dict]:
    """AMoLE layer cases: (module, held set) on random pools; x [2, 7, d] and a probe for grads."""
    cfg = PARITY_MODEL
    cases = []
    for i, (module, size) in enumerate(
        [
            ("model.layers.0.self_attn.q_proj", 2),
            ("model.layers.0.self_attn.q_proj", 3),
            ("model.layers.1.self_attn.v_proj", 4),
            ("model.layers.0.self_attn.v_proj", LAYER_E),
        ]
    ):
        rng = np.random.default_rng(100 + i)
        held = random_held(rng, LAYER_E, size)
        d_in, d_out = module_dims(cfg, module)
        x = rng.standard_normal((2, 7, d_in)).astype(np.float32)
        probe = rng.standard_normal((2, 7, d_out)).astype(np.float32)
        cases.append(dict(module=module, held=held, x=x, probe=probe, pool_seed=200 + i))
    return cases


def model_case() -> dict:
    """Whole-model case: random held sets per module (2..E), 2 sequences of 24 tokens, the
    first 10 positions of each label masked (prompt)."""
    cfg = PARITY_MODEL
    rng = np.random.default_rng(300)
    held = {
        name: random_held(rng, LAYER_E, int(rng.integers(2, LAYER_E + 1)))
        for name in module_names(cfg["num_hidden_layers"])
    }
    ids = rng.integers(3, 400, (2, 24)).astype(np.int64)
    labels = ids.copy()
    labels[:, :10] = -100
    return dict(held=held, ids=ids, labels=labels, pool_seed=301)


RSEA = dict(num_clients=4, num_experts=8, k=2, lo=2, hi=6)


def rsea_case() -> dict:
    """Round-1 RSEA inputs: one assignment per module, a pool per module, every client's local
    copy (pool + noise), every client's aux sequences (3 of varying length)."""
    cfg, c, e = PARITY_MODEL, RSEA["num_clients"], RSEA["num_experts"]
    rng = np.random.default_rng(400)
    names = module_names(cfg["num_hidden_layers"])
    assign = {n: random_assignment(rng, e, c, RSEA["k"], RSEA["lo"], RSEA["hi"]) for n in names}
    pools = {n: random_pool(rng, *module_dims(cfg, n), e) for n in names}
    local = [{n: perturb(rng, pools[n], 0.3) for n in names} for _ in range(c)]
    aux = [
        [rng.integers(3, 400, int(length)).astype(np.int64) for length in rng.integers(8, 20, 3)]
        for _ in range(c)
    ]
    return dict(assign=assign, pools=pools, local=local, aux=aux)


ASSIGN_CONFIGS = [  # (E, C, k, lo, hi, homo)
    (30, 10, 2, 2, 8, False),  # the reference default
    (30, 20, 4, 2, 8, False),  # the 20-client scaling runs (k_sel 4)
    (15, 10, 3, 2, 8, False),
    (8, 4, 2, 2, 6, False),
    (30, 10, 2, 6, 6, True),  # --homo_arch: every client exactly E*k/C experts
]


def assign_instances(per_config: int = 40) -> list[dict]:
    """Random RSEA score matrices: half U(0,1) softmaxed over clients (round 0), half
    softmax_c(N(0, 2)) (peaked, like trained embeddings)."""
    rng = np.random.default_rng(500)
    out = []
    for ci, (e, c, k, lo, hi, homo) in enumerate(ASSIGN_CONFIGS):
        for j in range(per_config):
            s = rng.uniform(size=(e, c)) if j % 2 == 0 else rng.normal(0, 2.0, (e, c))
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            out.append(dict(config=ci, E=e, C=c, k=k, lo=lo, hi=hi, homo=homo, P=p))
    return out


# ---------------------------------------------------------------------------------------------
# Trajectory (task 2): 3 clients, fixed (static) architecture, identical batches.

TRAJ = dict(
    num_clients=3,
    num_experts=6,
    k=2,
    lo=2,
    hi=6,
    rounds=2,
    steps=6,
    batch=2,
    seq=32,
    examples=8,
    aux_examples=2,
    prompt_len=12,
    lr=1e-3,
    lr_decay=0.99,
    eps=1e-8,
    torch_seed=0,
    jax_seed=0,
)


def traj_examples(client: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `client`'s training examples: `[K, T]` token ids `[bos] prompt target eos` (every
    example exactly T tokens) and the target mask (1 on target + EOS, as both pipelines count)."""
    t, k, p = TRAJ["seq"], TRAJ["examples"], TRAJ["prompt_len"]
    rng = np.random.default_rng(600 + client)
    ids = rng.integers(3, 400, (k, t)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 0, 1  # fixture tokenizer: bos 0, eos 1
    mask = np.zeros((k, t), np.int64)
    mask[:, p:] = 1
    return ids, mask


def traj_examples_var(client: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Client `client`'s training examples of different lengths (issue 14 point 6): `(ids, mask)`
    per example, `[bos] prompt target eos` of `prompt_len + 3 .. T` tokens, prompts of 4 ..
    `prompt_len` tokens, mask 1 on target + EOS. Batches of them need padding: the reference's
    collator pads on the left, fedjax_lora's `instruction_packing="examples"` pads each example's
    slot on the right."""
    t, k, p_max = TRAJ["seq"], TRAJ["examples"], TRAJ["prompt_len"]
    rng = np.random.default_rng(700 + client)
    out = []
    for _ in range(k):
        n, p = int(rng.integers(p_max + 3, t + 1)), int(rng.integers(4, p_max + 1))
        ids = rng.integers(3, 400, n).astype(np.int64)
        ids[0], ids[-1] = 0, 1  # fixture tokenizer: bos 0, eos 1
        mask = np.zeros(n, np.int64)
        mask[p:] = 1
        out.append((ids, mask))
    return out


# ---------------------------------------------------------------------------------------------
# Speed (task 3): the same small configuration on both sides.

SPEED = dict(
    num_clients=8,
    num_experts=8,
    k=4,
    lo=2,
    hi=8,
    steps=10,
    batch=int(os.environ.get("SPEED_BATCH", "8")),  # speed.py --batch
    seq=128,
    train_examples=64,
    aux_examples=2,
    prompt_len=40,
)


def speed_examples(client: int) -> tuple[list[dict], list[dict]]:
    """(train, aux) examples of one client, as the reference's preprocessed rows: `seq` random
    tokens `[bos] ... eos` with the first `prompt_len` labels masked (-100)."""
    s = SPEED
    rng = np.random.default_rng(700 + client)

    def make(n):
        rows = []
        for _ in range(n):
            ids = rng.integers(3, SPEED_MODEL["vocab_size"], s["seq"]).tolist()
            ids[0], ids[-1] = 0, 1
            labels = [-100] * s["prompt_len"] + ids[s["prompt_len"] :]
            rows.append({"input_ids": ids, "attention_mask": [1] * s["seq"], "labels": labels})
        return rows

    return make(s["train_examples"]), make(s["aux_examples"])


def traj_aux(client: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `client`'s aux examples for the RSEA statistics (`[aux_examples, T]`, same form)."""
    t, k, p = TRAJ["seq"], TRAJ["aux_examples"], TRAJ["prompt_len"]
    rng = np.random.default_rng(650 + client)
    ids = rng.integers(3, 400, (k, t)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 0, 1
    mask = np.zeros((k, t), np.int64)
    mask[:, p:] = 1
    return ids, mask
