"""Pretrain a tiny GPT-2 on the synthetic corpus's sources and save it as a Hugging Face checkpoint.

The trust-weighted paper fine-tunes LoRA on a *pretrained* GPT-2: the base already models text in
general, each client's few tokens specialise it, and Local overfits (spec §5). A random tiny base
does not have that regime (LoRA on it is capacity-bound), so the offline evidence uses this
script's base instead: all weights of a tiny GPT-2 trained on chains of
`make_markov_sources(G, V, seed=seed)` — the chains `data.source: synthetic` draws the clients
from with `data.seed = seed` — with documents sampled from an independent RNG stream, so no client
text is seen in pretraining. `--on common` (default) pretrains on the common chain only: with
`data.overlap = o` every group's text is `o` common and `1 - o` its own chain, which the base has
never seen (the general-text / domain split of the paper); `--on groups` pretrains on the uniform
mixture of the group chains (a base that already knows every domain). `--fortunes-language en
--vocab-size 256` instead trains a byte-level base on that language's Debian fortunes (real text;
clients of other languages are then new domains). The output directory
(`config.json` + `model.safetensors`) loads with `model.source=DIR`:

    python experiments/trust_weighted/pretrain_synthetic_base.py --out runs/synthetic_base
    fedjax-lora demo --set model.source=runs/synthetic_base ...
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_lora.data import fortunes
from fedjax_lora.data.synthetic import make_markov_sources
from fedjax_lora.engine.loss import token_cross_entropy
from fedjax_lora.engine.optim import standard_promotion
from fedjax_lora.export import save_merged
from fedjax_lora.models import ModelConfig, from_config


def pretraining_windows(args: argparse.Namespace) -> np.ndarray:
    """`int32 [D, seq_len + 1]` documents from the common chain or the group chains' mixture, or
    (`--fortunes-language`) random byte windows of that language's Debian fortunes."""
    if args.fortunes_language:
        texts = fortunes.load_language(args.fortunes_language, args.fortunes_dir)
        stream = np.frombuffer("\n".join(texts).encode("utf-8"), np.uint8).astype(np.int32)
        rng = np.random.default_rng([args.data_seed, 7919])
        starts = rng.integers(0, len(stream) - args.seq_len - 1, size=args.documents)
        return stream[starts[:, None] + np.arange(args.seq_len + 1)]
    sources = make_markov_sources(args.num_groups, args.vocab_size, seed=args.data_seed)
    rng = np.random.default_rng([args.data_seed, 7919])
    if args.on == "common":
        groups = np.full(args.documents, args.num_groups)
    else:
        groups = rng.integers(0, args.num_groups, size=args.documents)
    return sources.sample(groups, args.seq_len + 1, rng)


def pretrain(args: argparse.Namespace) -> nnx.Module:
    cfg = ModelConfig(
        family="gpt2",
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        d_ff=args.d_ff,
        max_positions=args.max_positions,
    )
    model = from_config(cfg, seed=args.model_seed)
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 20, args.steps)
    tx = standard_promotion(optax.adamw(schedule, b2=0.95, weight_decay=0.01))
    docs = jnp.asarray(pretraining_windows(args))

    def loss_fn(p, batch):
        logits = nnx.merge(graphdef, p)(batch[:, :-1])
        return token_cross_entropy(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(p, opt, key):
        batch = docs[jax.random.randint(key, (args.batch_size,), 0, docs.shape[0])]
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt = tx.init(params)
    key = jax.random.key(args.model_seed)
    start = time.time()
    for i in range(args.steps):
        params, opt, loss = step(params, opt, jax.random.fold_in(key, i))
        if (i + 1) % max(args.steps // 10, 1) == 0:
            print(
                f"step {i + 1}/{args.steps}  loss {float(loss):.3f}  ({time.time() - start:.0f} s)"
            )
    nnx.update(model, params)
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num-groups", type=int, default=4)
    p.add_argument("--on", choices=("common", "groups"), default="common")
    p.add_argument(
        "--fortunes-language",
        help="pretrain a byte-level base (--vocab-size 256) on this language's fortunes instead",
    )
    p.add_argument("--fortunes-dir", default=str(fortunes.FORTUNES_ROOT))
    p.add_argument("--data-seed", type=int, default=0, help="= the demo's data.seed")
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--max-positions", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--documents", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--model-seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.fortunes_language and args.vocab_size != 256:
        raise SystemExit("--fortunes-language trains a byte-level base: use --vocab-size 256")
    out = save_merged(pretrain(args), args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
