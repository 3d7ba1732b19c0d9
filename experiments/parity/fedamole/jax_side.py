"""fedjax_lora side of the FedAMoLE parity tests (run in the fedjax_lora venv) on the same common
inputs as `ref_side.py`; writes OUT_DIR/results/jax_*.npz|json.

  python jax_side.py layer model rsea assign data      # any subset of the sections

Every quantity comes from the project's public functions: `amole.AMoLE` (router internals read
by wrapping `jax.nn.softmax` / `jax.lax.top_k` during an eager call), `models.weights.load_hf`,
`engine.loss.lm_loss`, `amole.make_client_stats`, `aggregation.rsea.{scores,assign}`,
`aggregation.experts.holder_average` with `amole.holders`, `data.partition.dirichlet`,
`data.instruction.client_splits`, `data.datasets_hf.load_{dolly,snli}`,
`data.tokenize.tokenize_prompt_target`, `engine.instruction.rouge_l`.
"""

from __future__ import annotations

import json
import sys
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

jax.config.update("jax_default_matmul_precision", "highest")

from fedjax_lora import amole, lora  # noqa: E402
from fedjax_lora.aggregation import holder_average, rsea  # noqa: E402
from fedjax_lora.engine.batches import Batch  # noqa: E402
from fedjax_lora.engine.loss import lm_loss  # noqa: E402
from fedjax_lora.models.weights import load_hf, read_safetensors  # noqa: E402

sys.path.insert(0, str(common.HERE.parent))
from results import has_param  # noqa: E402

FIXTURE = common.fixtures() / "tiny_parity"


def amole_config(num_experts: int) -> amole.AMoLEConfig:
    return amole.AMoLEConfig(
        targets=("q_proj", "v_proj"),
        num_experts=num_experts,
        rank=common.RANK,
        alpha=common.ALPHA,
        dropout=0.0,
        top_k=common.TOP_K,
        load_balance=common.LB_COEF,
    )


def set_module(m: amole.AMoLE, pool: dict, held: np.ndarray) -> None:
    """Torch-layout pool values into one AMoLE module (kernels are `(in, out)` here)."""
    t = lambda a: jnp.asarray(np.swapaxes(a, -1, -2))
    m.experts_a.set_value(t(pool["A"]))
    m.experts_b.set_value(t(pool["B"]))
    m.token_proj.set_value(t(pool["W"]))
    m.shared.a.set_value(t(pool["sA"]))
    m.shared.b.set_value(t(pool["sB"]))
    m.held.set_value(jnp.asarray(held, bool))


def amole_modules(model) -> dict[str, amole.AMoLE]:
    """`{reference module name: AMoLE}` ("model.layers.0.self_attn.q_proj")."""
    out = {}
    for path, m in nnx.iter_graph(model):
        if isinstance(m, amole.AMoLE):
            name = ".".join(str(p) for p in path)
            out[name.removesuffix(".lora")] = m
    return out


def amole_model(num_experts: int, pools: dict, held: dict):
    model = load_hf(FIXTURE)
    amole.add_amole(model, amole_config(num_experts))
    for name, m in amole_modules(model).items():
        set_module(m, pools[name], held[name])
    return model


def to_torch_grads(g, held: np.ndarray) -> dict:
    """Gradients of one AMoLE module, torch layout, held experts only (+ the non-held max)."""
    t = lambda a: np.swapaxes(np.asarray(a), -1, -2)
    ga, gb = t(g["experts_a"][...]), t(g["experts_b"][...])
    return dict(
        gA=ga[held],
        gB=gb[held],
        gsA=t(g["shared"]["a"][...]),
        gsB=t(g["shared"]["b"][...]),
        gW=t(g["token_proj"][...]),
        nonheld_max=np.float32(
            max(np.abs(ga[~held]).max(initial=0.0), np.abs(gb[~held]).max(initial=0.0))
        ),
    )


class Spy:
    """Wraps `jax.nn.softmax` and `jax.lax.top_k` during an eager (un-jitted) call."""

    def __enter__(self):
        self.log = []
        self._softmax, self._top_k = jax.nn.softmax, jax.lax.top_k

        def softmax(x, *a, **k):
            out = self._softmax(x, *a, **k)
            self.log.append(("softmax", x, out))
            return out

        def top_k(x, k):
            out = self._top_k(x, k)
            self.log.append(("top_k", x, out))
            return out

        jax.nn.softmax, jax.lax.top_k = softmax, top_k
        return self

    def __exit__(self, *exc):
        jax.nn.softmax, jax.lax.top_k = self._softmax, self._top_k


# ---------------------------------------------------------------------------------------------


def section_layer():
    base = read_safetensors(FIXTURE)
    out = {}
    for i, case in enumerate(common.layer_cases()):
        pools = common.model_pools(common.PARITY_MODEL, common.LAYER_E, case["pool_seed"])
        d_in, d_out = common.module_dims(common.PARITY_MODEL, case["module"])
        m = amole.AMoLE(d_in, d_out, amole_config(common.LAYER_E))
        set_module(m, pools[case["module"]], case["held"])
        w0 = jnp.asarray(base[case["module"] + ".weight"]).T
        x, probe, held = jnp.asarray(case["x"]), jnp.asarray(case["probe"]), case["held"]
        forward = nnx.capture(lambda mod, v: mod(v), nnx.Intermediate, amole.RoutingEmbeddings)
        with Spy() as spy:
            delta, inter, emb = forward(m, x)
        assert [n for n, _, _ in spy.log] == ["softmax", "top_k"], spy.log
        (lb,) = inter["aux_loss"].get_value()
        ((token, keys),) = emb["embeddings"].get_value()
        masked_logits = np.asarray(spy.log[0][1]).reshape(-1, common.LAYER_E)
        probs = np.asarray(spy.log[0][2]).reshape(-1, common.LAYER_E)
        top, chosen = (np.asarray(a).reshape(-1, common.TOP_K) for a in spy.log[1][2])
        gates_full = np.zeros_like(probs)
        np.put_along_axis(gates_full, chosen, top / top.sum(-1, keepdims=True), axis=1)
        graphdef, params, rest = nnx.split(m, lora.Adapter, ...)

        def loss(p, graphdef=graphdef, rest=rest, x=x, w0=w0, probe=probe):
            mod = nnx.merge(graphdef, p, rest)
            d, inter = nnx.capture(lambda mm, inp: mm(inp), nnx.Intermediate)(mod, x)
            (aux,) = inter["aux_loss"].get_value()
            return jnp.sum((x @ w0 + d) * probe) + aux

        grads = jax.grad(loss)(params)
        res = dict(
            y=np.asarray(x @ w0 + delta),
            logits=masked_logits[:, held],
            masked_logits_nonheld=np.float32(np.max(masked_logits[:, ~held], initial=-np.inf)),
            probs=probs[:, held],
            probs_nonheld_max=np.float32(np.abs(probs[:, ~held]).max(initial=0.0)),
            gates_full=gates_full,
            lb=np.asarray(lb),
            token_embs=np.asarray(token).reshape(-1, common.RANK),
            expert_embs=np.asarray(keys).reshape(-1, common.LAYER_E, common.RANK)[:, held],
            **to_torch_grads(grads, held),
        )
        out.update({f"c{i}_{k}": v for k, v in res.items()})
    common.save_npz("jax_layer.npz", **out)


def section_model():
    case = common.model_case()
    pools = common.model_pools(common.PARITY_MODEL, common.LAYER_E, case["pool_seed"])
    model = amole_model(common.LAYER_E, pools, case["held"])
    graphdef, params, base = lora.split(model)
    ids, labels = case["ids"], case["labels"]
    # The reference feeds all L tokens and shifts inside; here inputs are the same L tokens and
    # the last target (none in the reference) gets weight 0, so CE and the LB token set match.
    targets = np.concatenate([ids[:, 1:], np.zeros((ids.shape[0], 1), ids.dtype)], 1)
    weights = np.concatenate([labels[:, 1:] != -100, np.zeros((ids.shape[0], 1), bool)], 1)
    batch = Batch(
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(targets, jnp.int32),
        jnp.asarray(weights, jnp.float32),
    )
    (loss, parts), grads = jax.value_and_grad(
        lambda p: lm_loss(graphdef, p, base, batch, None), has_aux=True
    )(params)
    logits = nnx.merge(graphdef, params, base)(batch.inputs)
    res = dict(logits=np.asarray(logits), ce=np.asarray(parts["ce"]), lb=np.asarray(parts["aux"]))
    gmodel = nnx.merge(graphdef, grads, base)
    for name, m in amole_modules(gmodel).items():
        g = {
            "experts_a": m.experts_a,
            "experts_b": m.experts_b,
            "token_proj": m.token_proj,
            "shared": {"a": m.shared.a, "b": m.shared.b},
        }
        for k, v in to_torch_grads(g, case["held"][name]).items():
            res[f"{name}|{k}"] = v
    common.save_npz("jax_model.npz", **res)


def section_rsea():
    case = common.rsea_case()
    cfg = common.RSEA
    c_num, e_num = cfg["num_clients"], cfg["num_experts"]
    names = list(case["pools"])
    ref = common.load_npz("ref_rsea.npz")  # for scoring/assigning the reference's own uploads
    out = {}
    states, masks = [], []
    t_all = {n: [] for n in names}
    u_all = {n: [] for n in names}
    for c in range(c_num):
        held = {n: case["assign"][n][:, c] for n in names}
        model = amole_model(e_num, case["local"][c], held)
        graphdef, params, base = lora.split(model)
        seqs = case["aux"][c]
        width = max(len(s) for s in seqs)
        inputs = np.zeros((len(seqs), width), np.int32)
        weights = np.zeros((len(seqs), width), np.float32)
        for j, s in enumerate(seqs):
            inputs[j, : len(s)], weights[j, : len(s)] = s, 1.0
        stats = amole.make_client_stats(graphdef, 1)(params, inputs, weights, base)
        for path, (t, u) in stats.items():
            n = path.removesuffix(".lora")
            t_all[n].append(np.asarray(t))
            u_all[n].append(np.asarray(u))
            out[f"{n}|t|{c}"] = np.asarray(t)
            out[f"{n}|u|{c}"] = np.asarray(u)[held[n]]
        states.append(params)
        masks.append(amole.expert_masks(base))
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    stacked, stacked_masks = stack(states), stack(masks)
    agg = holder_average(stacked, amole.holders(stacked, stacked_masks))
    agg_model = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], agg), base)
    t = lambda a: np.swapaxes(np.asarray(a), -1, -2)
    for n, m in amole_modules(agg_model).items():
        out[f"{n}|aggA"], out[f"{n}|aggB"] = t(m.experts_a[...]), t(m.experts_b[...])
        out[f"{n}|aggsA"], out[f"{n}|aggsB"] = t(m.shared.a[...]), t(m.shared.b[...])
        out[f"{n}|aggW"] = t(m.token_proj[...])
    k, lo, hi = cfg["k"], cfg["lo"], cfg["hi"]
    for n in names:
        held = case["assign"][n].T  # [C, E]
        tm, um = np.stack(t_all[n]), np.stack(u_all[n])
        out[f"{n}|keys"] = np.asarray(rsea.expert_keys(um, held))
        p = np.asarray(rsea.scores(tm, um, held))
        out[f"{n}|P"], out[f"{n}|X"] = p, rsea.assign(p, k, lo, hi)
        # Scoring and solving the reference's own uploads (isolates scoring from statistics).
        ref_t = np.stack([ref[f"{n}|t|{c}"] for c in range(c_num)])
        ref_u = np.zeros((c_num, e_num, common.RANK), np.float32)
        for c in range(c_num):
            ref_u[c, held[c]] = ref[f"{n}|u|{c}"]
        p_ref_inputs = np.asarray(rsea.scores(ref_t, ref_u, held))
        out[f"{n}|P_from_ref_stats"] = p_ref_inputs
        out[f"{n}|X_from_ref_P"] = rsea.assign(ref[f"{n}|P"], k, lo, hi)
    common.save_npz("jax_rsea.npz", **out)


def section_assign():
    insts = common.assign_instances()
    xs, objs, secs = [], [], []
    for inst in insts:
        t = time.perf_counter()
        x = rsea.assign(inst["P"], inst["k"], inst["lo"], inst["hi"])
        secs.append(time.perf_counter() - t)
        xs.append(x.ravel())
        objs.append(float(np.sum(inst["P"] * x)))
    flat, offsets = common.pack(xs)
    common.save_npz("jax_assign.npz", X=flat, offsets=offsets, obj=objs, seconds=secs)


def section_data():
    from fedjax_lora.data import instruction as ins
    from fedjax_lora.data.datasets_hf import load_dolly, load_snli
    from fedjax_lora.data.instruction import client_splits, default_bos_id
    from fedjax_lora.data.partition import dirichlet
    from fedjax_lora.data.prompts import SNLI_CHOICES
    from fedjax_lora.data.tokenize import encode_batch, eos_token_id, tokenize_prompt_target
    from fedjax_lora.engine.instruction import rouge_l
    from fedjax_lora.models.tokenizer import load_tokenizer

    fx = common.fixtures()
    cache = common.out_dir() / "hf_cache"
    dolly = load_dolly(fx / "dolly.jsonl", cache_dir=cache)
    snli = load_snli(fx / "snli.jsonl", cache_dir=cache)
    snli_rows = common.read_jsonl(fx / "snli.jsonl")
    snli_all = np.array([r["label"] for r in snli_rows])
    kept = np.flatnonzero((snli_all >= 0) & (snli_all < 3))  # load_snli's row filter
    res, meta = {"labels_dolly": dolly.labels, "labels_snli_kept": snli.labels}, {}
    switches = meta["switches"] = {}  # issue-14 points whose switch is missing here
    ref_parts = common.load_npz("ref_data.npz")
    caps = {"dolly": (0.1, 0.1, 200, 50)}
    snli_eval = 10000 / (550152 + 10000 + 10000)
    caps["snli"] = (snli_eval, snli_eval, 200, 200)
    # issue 14 point 9: the project's partition + split pipeline, as the reference's
    # ClientDataLoader (K counts SNLI's -1, the legacy RNG stream continues into the splits)
    pipeline = hasattr(ins, "partition_examples") and has_param(client_splits, "aux_fraction")
    if pipeline:
        labels = {
            "dolly": dolly.labels,
            "snli": load_snli(fx / "snli.jsonl", cache_dir=cache, unlabelled=True).labels,
        }
    else:
        switches[9] = (
            "data.instruction.partition_examples, client_splits(aux_fraction=...), "
            "load_snli(unlabelled=True) (issue 14 point 9)"
        )
    for seed in (42, 62, 82):
        for alpha in (0.1, 1.0, 100.0):
            key = f"snli_{seed}_{alpha}"
            # The partitioner alone, called as the reference calls partition_idx_dir (its labels
            # with -1, K = the number of distinct labels).
            try:
                parts = dirichlet(snli_all, 10, alpha, seed, num_classes=np.unique(snli_all).size)
            except (ValueError, IndexError) as e:
                print(f"dirichlet on labels with -1 raised {type(e).__name__}: {e}")
                parts = [np.zeros(0, np.int64)] * 10
            res[f"part_snliraw_{key}"], res[f"off_snliraw_{key}"] = common.pack(parts)
            if pipeline:
                for dname in ("dolly", "snli"):
                    val, test, max_val, max_test = caps[dname]
                    rng = np.random.RandomState(seed)
                    parts = ins.partition_examples(labels[dname], 10, "dirichlet", alpha, rng)
                    pk = f"{dname}_{seed}_{alpha}"
                    res[f"part_{pk}"], res[f"off_{pk}"] = common.pack(parts)
                    splits = client_splits(
                        parts,
                        val_fraction=val,
                        test_fraction=test,
                        max_val=max_val,
                        max_test=max_test,
                        seed=rng,
                        aux_fraction=0.05,
                        max_aux=200,
                    )
                    for name in ("train", "aux", "val", "test"):
                        k = f"{name}_{pk}"
                        res[f"split_{k}"], res[f"splitoff_{k}"] = common.pack(
                            [s[name] for s in splits]
                        )
                    res[f"sizes_{pk}"] = np.array(
                        [
                            [len(s["train"]) + len(s["aux"]), len(s["val"]), len(s["test"])]
                            for s in splits
                        ]
                    )
                continue
            parts = dirichlet(dolly.labels, 10, alpha, seed, num_classes=len(dolly.label_names))
            res[f"part_dolly_{seed}_{alpha}"], res[f"off_dolly_{seed}_{alpha}"] = common.pack(parts)
            # The project's pipeline before issue 14: -1 rows dropped first, then K = 3 classes.
            parts = dirichlet(snli.labels, 10, alpha, seed, num_classes=3)
            res[f"part_{key}"], res[f"off_{key}"] = common.pack([kept[p] for p in parts])
            for dname in ("dolly", "snli"):
                # Split rule alone: the project's client_splits on the reference's partition.
                pk = f"{dname}_{seed}_{alpha}"
                ps = common.to_list_of_arrays(ref_parts[f"part_{pk}"], ref_parts[f"off_{pk}"])
                val, test, max_val, max_test = caps[dname]
                splits = client_splits(
                    ps,
                    val_fraction=val,
                    test_fraction=test,
                    max_val=max_val,
                    max_test=max_test,
                    seed=seed,
                )
                res[f"sizes_{pk}"] = np.array(
                    [[len(s["train"]), len(s["val"]), len(s["test"])] for s in splits]
                )
    tok = load_tokenizer(common.fixtures() / "tiny_parity")
    bos, eos = default_bos_id(tok), eos_token_id(tok)
    meta["bos"], meta["eos"] = bos, eos
    meta["dolly_prompts"] = list(dolly.prompts[:600])
    meta["dolly_targets"] = list(dolly.targets[:600])
    for dname, prompts, targets in (
        ("dolly", dolly.prompts[:600], dolly.targets[:600]),
        ("snli", snli.prompts[:300], snli.targets[:300]),
    ):
        ids, masks = [], []
        for p, t in zip(prompts, targets, strict=True):
            s = tokenize_prompt_target([p], [t], tok, vocab_size=512, eos_id=eos, bos_id=bos)
            ids.append(np.asarray(s.tokens))
            masks.append(np.asarray(s.loss_mask))
        res[f"{dname}_ids"], res[f"{dname}_ids_off"] = common.pack(ids)
        res[f"{dname}_mask"], _ = common.pack(masks)
    # issue 14 point 6: one padded example per row, cut at the reference's max length with EOS
    # forced, over-long prompts dropped (`tokenize_example_rows`), every Dolly example
    from fedjax_lora.data import tokenize as tokenize_mod

    if hasattr(tokenize_mod, "tokenize_example_rows"):
        max_len = common.load_json("ref_data.json")["model_max_length"]  # the reference's
        rows, kept = tokenize_mod.tokenize_example_rows(
            dolly.prompts[:600],
            dolly.targets[:600],
            tok,
            vocab_size=512,
            max_length=max_len,
            eos_id=eos,
            bos_id=bos,
        )
        slots = np.asarray(rows.tokens).reshape(len(kept), max_len + 1)
        slot_masks = np.asarray(rows.loss_mask).reshape(len(kept), max_len + 1)
        lengths = [int(np.flatnonzero(m)[-1]) + 1 for m in slot_masks]
        res["rows_kept"] = np.asarray(kept)
        res["rows_ids"], res["rows_off"] = common.pack(
            [s[:n] for s, n in zip(slots, lengths, strict=True)]
        )
        res["rows_mask"], _ = common.pack([m[:n] for m, n in zip(slot_masks, lengths, strict=True)])
    else:
        meta["switches"][6] = (
            "data.tokenize.tokenize_example_rows, LocalTraining(packing='examples') "
            "(issue 14 point 6)"
        )
    meta["snli_prompts"], meta["snli_targets"] = list(snli.prompts[:300]), list(snli.targets[:300])
    meta["snli_choice_ids"] = [list(c) + [eos] for c in encode_batch(tok, SNLI_CHOICES)]
    pairs = common.rouge_pairs()
    dec = lambda text: tok.decode(
        tok(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True
    )
    # issue 14 point 7: the paper's metric (PyPI `rouge` 1.0.1) as `rouge_l`'s implementation
    switches = meta["switches"]
    if has_param(rouge_l, "implementation"):
        rouge = lambda h, r: rouge_l(h, r, implementation="rouge")
        res["rouge_score_ids"] = np.array(
            [rouge_l(dec(h), r, implementation="rouge-score") for h, r in pairs]
        )
    else:
        switches[7] = "engine.instruction.rouge_l(..., implementation='rouge') (issue 14 point 7)"
        rouge = rouge_l
    res["rouge_str"] = np.array([rouge(h, r) for h, r in pairs])
    res["rouge_ids"] = np.array([rouge(dec(h), r) for h, r in pairs])  # engine: decode, raw ref
    common.save_npz("jax_data.npz", **res)
    common.save_json("jax_data.json", meta)


SECTIONS = dict(
    layer=section_layer,
    model=section_model,
    rsea=section_rsea,
    assign=section_assign,
    data=section_data,
)

if __name__ == "__main__":
    for name in sys.argv[1:] or list(SECTIONS):
        t = time.perf_counter()
        SECTIONS[name]()
        print(json.dumps({"jax_section": name, "seconds": round(time.perf_counter() - t, 2)}))
