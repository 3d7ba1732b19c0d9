"""Task 1: numeric parity of the trust rules, the mixing step and the LR schedule.

The reference's own functions (imported from `--ref-dir`/`REF_DIR`, see `refimport.py`) and
fedjax_lora's get the same inputs:

- S1 `dynamic` (weights): the same LoRA tensors in N real reference `GPTLoRA` models and in a
  stacked fedjax_lora adapter state; `__trust_weights_weights`/`clients_similarity` + softmax,
  the `-top-k`/`-thresh` variants, vs `weight_similarity`.
- S2 `dynamic-ref` (validation): (a) rule level: stub models whose `eval` loss is a given matrix
  `L[i, j]`, so `__trust_weights_ref` sees exactly `P = 2.71828 ** L`, vs `validation_trust(exp L)`;
  (b) pipeline: real models on the same fixed validation windows (injected into the reference's
  `get_batch`) vs `engine.crosseval` perplexities.
- S3 `dynamic-token` (prediction): (a) stub models returning given last-position logits (random,
  tied at the 100th value, bf16-rounded, duplicates) to `__trust_weights_token` vs
  `prediction_trust`; (b) pipeline: real models on the same reference windows vs
  `cross_eval.reference_logits` + `prediction_trust`.
- mixing: the reference's `__weighted_average` on the models vs `aggregation.mix`.
- `naive` vs `fedavg_matrix`; the OneCycleLR schedule vs `engine.optim.one_cycle`.

On the HEAD layout everything above runs; on the paper layout (branch `rebutal`) S2/S3 live
inline in `train_lora` and only S1/naive/static/mixing/schedule run here (the trajectory covers
S2/S3 there).

    REF_DIR=<exported reference> python parity_rules.py [--work DIR] [--out-dir OUT_DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from argparse import Namespace
from contextlib import nullcontext
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Feeder,
    TinyGPT2,
    copy_adapters_to_ref,
    jax_adapters,
    jax_model_from_hf,
    markov_streams,
    max_abs_diff,
    ref_adapters,
    ref_model_from_hf,
    stacked_from_ref_names,
    window_provider,
    write_tiny_gpt2,
)
from refimport import load_reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import Results  # noqa: E402

R = Results("rules")


def record(quantity, diff, tol, note=""):
    R.check(quantity, diff, tol, note)


def info(quantity, value, note=""):
    R.info(quantity, value, note)


class Capture:
    """Wraps the reference's `__weighted_average` to record every trust matrix it receives
    (and still mixes, unless `mix=False`)."""

    def __init__(self, REF, mix=True):
        self.mod = REF.strategies if REF.layout == "head" else REF.lora
        self.orig = getattr(self.mod, "__weighted_average")
        self.mats = []
        self.mix = mix

        def wrapper(clients, trust_weights, *rest):
            self.mats.append(np.array(trust_weights, dtype=np.float64))
            if self.mix:
                return self.orig(clients, trust_weights, *rest)
            return None

        setattr(self.mod, "__weighted_average", wrapper)

    def close(self):
        setattr(self.mod, "__weighted_average", self.orig)


def compare_selection(tag, scores, w_ref, w_jax) -> np.ndarray:
    """Rows whose selected peers (`W > 0`) agree between the reference and fedjax_lora; the
    others must be exact ties. The reference's `torch.topk` breaks exact ties in an
    implementation-defined order; fedjax_lora gives a tie to the client itself, then to the lower
    index (issue 14 point 10). So on a row where they choose differently: both selections must
    hold the same scores (the same tie class), and the client itself must be selected whenever its
    score ties the lowest selected one."""
    sel_ref, sel_jax = w_ref > 1e-12, w_jax > 1e-12
    same = (sel_ref == sel_jax).all(1)
    ties = np.flatnonzero(~same)
    if len(ties) == 0:
        return same
    info(
        f"{tag}: rows where exact ties let the reference select other peers",
        len(ties),
        f"rows {ties.tolist()}",
    )
    class_diff, self_dropped = 0.0, 0
    for i in ties:
        a, b = np.sort(scores[i, sel_ref[i]]), np.sort(scores[i, sel_jax[i]])
        class_diff = max(class_diff, np.inf if a.shape != b.shape else np.abs(a - b).max())
        self_dropped += int(scores[i, i] >= b.min() and not sel_jax[i, i])
    record(f"{tag}: tie rows select from the reference's tie class", class_diff, 1e-6)
    record(f"{tag}: tie rows keep the client itself (issue 14 point 10)", self_dropped, 0)
    return same


def quiet():
    return contextlib.redirect_stdout(io.StringIO())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-dir", default=None)
    ap.add_argument("--work", default=None, help="scratch dir (tiny HF base); default: temp dir")
    ap.add_argument("--out-dir", default=None, help="results go to OUT_DIR/parts/ ($OUT_DIR)")
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    REF = load_reference(args.ref_dir)
    R.part = f"rules_{REF.layout}"
    torch = REF.torch
    F = torch.nn.functional
    import jax
    import jax.numpy as jnp

    from fedjax_lora import lora
    from fedjax_lora.aggregation import (
        fedavg_matrix,
        mix,
        oracle_trust,
        prediction_trust,
        validation_trust,
        weight_similarity,
        weight_similarity_scores,
    )
    from fedjax_lora.engine.crosseval import make_cross_eval
    from fedjax_lora.engine.evaluate import make_eval_set
    from fedjax_lora.engine.optim import one_cycle
    from fedjax_lora.engine.strategy import Strategy

    print(
        f"reference layout: {REF.layout} ({REF.root.name}); torch {torch.__version__}; "
        f"jax {jax.__version__}"
    )
    work = Path(args.work or tempfile.mkdtemp(prefix="trustparity_"))
    N, rank, alpha = args.clients, 4, 32.0
    cfg = TinyGPT2(vocab=256, d=64, layers=2, heads=4, positions=32, seed=args.seed)
    hf_dir = write_tiny_gpt2(work / "tiny_gpt2", cfg)
    rng = np.random.default_rng(args.seed)

    models = [ref_model_from_hf(REF, hf_dir, lora_rank=rank, lora_alpha=alpha) for _ in range(N)]
    clients = [[m, None, None] for m in models]
    jmodel = jax_model_from_hf(hf_dir, rank=rank, alpha=alpha)
    graphdef, template, base = lora.split(jmodel)
    shapes = {k: v.shape[1:] for k, v in ref_adapters(models[:1]).items()}
    ref_args = Namespace(device="cpu", wandb=False, k=3, dataset=None)

    def adapters(kind):
        out = {}
        for name, shp in shapes.items():
            is_a = name.endswith("lora_A")
            a = rng.uniform(-0.5, 0.5, size=(N, *shp)).astype(np.float32)
            b = (0.05 * rng.standard_normal((N, *shp))).astype(np.float32)
            x = a if is_a else b
            if kind == "init" and not is_a:
                x = np.zeros_like(x)
            if kind == "near-identical":
                x = np.broadcast_to(x[:1], x.shape) + 1e-3 * rng.standard_normal(x.shape).astype(
                    np.float32
                )
            if kind == "zero-client":
                x[2] = 0.0
            if kind == "tiny-rows":
                x[3] *= 1e-10  # row norms below F.cosine_similarity's eps 1e-8
            if kind == "duplicates":
                x[2] = x[1]
            out[name] = np.ascontiguousarray(x, np.float32)
        return out

    def ref_scores_weights():
        if REF.layout == "head":
            return REF.fn("__trust_weights_weights")(clients, REF.strategies.similarity_weights)
        return REF.lora.clients_similarity(clients, REF.lora.similarity_weights)

    def ref_aggregate_weights(variant):
        """W and mixed adapters from the reference's own aggregation entry point."""
        cap = Capture(REF)
        try:
            if REF.layout == "head":
                trust = {
                    "plain": "dynamic",
                    "top-k": "dynamic-top-k",
                    "thresh": "dynamic-thresh",
                    "naive": "naive",
                }[variant]
                REF.strategies.aggregate(clients, trust, {}, 8, 4, nullcontext(), ref_args)
            else:
                fn = {
                    "plain": lambda: REF.fn("__average_dynamic")(clients),
                    "top-k": lambda: REF.fn("__average_dynamic_top_k")(clients, 3),
                    "thresh": lambda: REF.fn("__average_dynamic_threshold")(clients),
                    "naive": lambda: REF.fn("__average")(clients),
                }[variant]
                with quiet():
                    fn()
        finally:
            cap.close()
        return cap.mats[-1], ref_adapters(models)

    # ---------------------------------------------------------------- S1: weight similarity
    print("\n== S1 `dynamic` (LoRA weight cosine) ==")
    for kind in ("random", "init", "near-identical", "zero-client", "tiny-rows", "duplicates"):
        arrays = adapters(kind)
        stacked = stacked_from_ref_names(template, arrays)
        copy_adapters_to_ref(arrays, models)
        s_ref = ref_scores_weights().numpy()
        s_jax = np.asarray(weight_similarity_scores(stacked))
        record(f"S1 scores S [{kind}]", np.abs(s_ref - s_jax).max(), 1e-5)
        for variant, opts in (
            ("plain", {}),
            ("top-k", {"top_peers": 3}),
            ("thresh", {"threshold": 0.5, "min_keep": 2}),
        ):
            copy_adapters_to_ref(arrays, models)
            w_ref, mixed_ref = ref_aggregate_weights(variant)
            w_jax = np.asarray(weight_similarity(stacked, **opts))
            mixed_jax = jax_adapters(mix(stacked, w_jax))
            same = compare_selection(f"S1 [{kind}, {variant}]", s_ref, w_ref, w_jax)
            record(
                f"S1 W [{kind}, {variant}]{'' if same.all() else ', rows with the same selection'}",
                np.abs(w_ref - w_jax)[same].max(initial=0.0),
                1e-5,
            )
            record(
                f"S1 mixed adapters [{kind}, {variant}]"
                + ("" if same.all() else ", clients with the same selection"),
                max_abs_diff(
                    {k: v[same] for k, v in mixed_ref.items()},
                    {k: v[same] for k, v in mixed_jax.items()},
                ),
                1e-5,
            )

    # ---------------------------------------------------------------- naive / FedAvg
    arrays = adapters("random")
    stacked = stacked_from_ref_names(template, arrays)
    copy_adapters_to_ref(arrays, models)
    w_ref, mixed_ref = ref_aggregate_weights("naive")
    w_jax = np.asarray(fedavg_matrix(N))
    record("naive W (1/N)", np.abs(w_ref - w_jax).max(), 1e-7)
    record("naive mixed adapters", max_abs_diff(mixed_ref, jax_adapters(mix(stacked, w_jax))), 1e-6)

    # ---------------------------------------------------------------- mixing alone
    w = rng.dirichlet(np.ones(N), size=N).astype(np.float32)
    copy_adapters_to_ref(arrays, models)
    cap = Capture(REF)
    try:
        if REF.layout == "head":
            REF.fn("__weighted_average")(clients, torch.from_numpy(w), ref_args)
        else:
            with quiet():
                REF.fn("__weighted_average")(clients, torch.from_numpy(w))
    finally:
        cap.close()
    record(
        "mix: __weighted_average vs aggregation.mix (random row-stochastic W)",
        max_abs_diff(ref_adapters(models), jax_adapters(mix(stacked, w))),
        1e-6,
    )

    # ---------------------------------------------------------------- schedule
    print("\n== OneCycleLR vs one_cycle ==")
    for total, pct in ((500, 0.02), (20, 0.2), (20, 0.02), (10, 0.02)):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=2e-3)
        sch = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=2e-3,
            total_steps=total,
            pct_start=pct,
            anneal_strategy="cos",
            cycle_momentum=False,
            div_factor=1e2,
            final_div_factor=0.05,
        )
        lrs = []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        sched = one_cycle(2e-3, total, pct_start=pct, div_factor=100.0, final_div_factor=0.05)
        jl = np.array([float(sched(t)) for t in range(total)])
        record(
            f"LR schedule total={total} pct_start={pct} (rel.)",
            np.max(np.abs(jl - np.array(lrs)) / np.array(lrs)),
            1e-5,
        )

    # ---------------------------------------------------------------- oracle vs static
    print("\n== static / oracle ==")
    static_cases = {
        "agnews_specific": (8, lambda i: np.eye(4)[i // 2]),
        "three_multi_specific": (9, lambda i: np.eye(3)[i % 3]),
        "github_wiki_specific": (8, lambda i: np.eye(2)[i % 2]),
        "agnews_mixed": (
            4,
            lambda i: [
                [0.25, 0.75, 0, 0],
                [0.75, 0.25, 0, 0],
                [0, 0, 0.25, 0.75],
                [0, 0, 0.75, 0.25],
            ][i],
        ),
        "github_wiki_mixed": (8, lambda i: [0.75, 0.25] if i % 2 == 0 else [0.25, 0.75]),
        "three_multi_mixed": (9, lambda i: np.roll([0.75, 0.25, 0.0], i % 3)),
    }
    for dataset, (n, mixture) in static_cases.items():
        dummy = [[None, None, None] for _ in range(n)]
        if REF.layout == "head":
            w_ref = np.array(REF.fn("__static_weights")(dummy, dataset), np.float64)
            origin = "HEAD __static_weights (never applied: aggregate drops it)"
        else:
            cap = Capture(REF, mix=False)
            try:
                with quiet():
                    REF.fn("__average_static")(dummy, dataset)
            finally:
                cap.close()
            w_ref = cap.mats[-1]
            origin = "paper-era __average_static"
        w_jax = np.asarray(oracle_trust(np.array([mixture(i) for i in range(n)], np.float32)))
        info(
            f"static vs oracle [{dataset}]",
            np.abs(w_ref - w_jax).max(),
            f"{origin}; ref row sums {w_ref.sum(1).min():.4f}..{w_ref.sum(1).max():.4f}",
        )

    if REF.layout != "head":
        finish(args)
        return

    # ---------------------------------------------------------------- S2 rule level
    print("\n== S2 `dynamic-ref` (validation perplexity), rule level ==")
    feeder = Feeder(REF)

    class LossStub:
        """A model whose eval loss on client i's val data is L[i, j] (i read from the batch)."""

        def __init__(self, j, L):
            self.j, self.L, self.training = j, L, True

        def eval(self):
            self.training = False
            return self

        def train(self, mode=True):
            self.training = mode
            return self

        def __call__(self, x, targets=None, get_logits=False):
            i = int(x[0, 0])
            return {
                "loss": torch.tensor(self.L[i, self.j], dtype=torch.float32),
                "logits": torch.zeros((*x.shape, 2)),
            }

    T, B = 8, 4
    val_arrays = []
    for i in range(N):
        arr = np.full(64, i, np.int64)
        feeder.register(arr, lambda k, i=i: (np.full((B, T), i), np.full((B, T), i)))
        val_arrays.append(arr)
    base_L = rng.uniform(3.0, 4.1, size=(N, N))
    cases = {
        "moderate ppl 20-60": base_L,
        "high ppl 5e3-1.3e4": rng.uniform(8.5, 9.5, size=(N, N)),
        "close ppl (gaps ~0.03)": 3.5 + 1e-3 * rng.standard_normal((N, N)),
        "tied columns 1=2": np.concatenate([base_L[:, :2], base_L[:, 1:2], base_L[:, 3:]], 1),
    }
    for name, L in cases.items():
        L = L.astype(np.float32)
        stubs = [[LossStub(j, L), None, None] for j in range(N)]
        data = {"val": val_arrays}
        with quiet():
            scores = REF.fn("__trust_weights_ref")(stubs, data, T, B, nullcontext(), ref_args)
        p_ref = -scores.numpy().astype(np.float64)
        w_ref = F.softmax(scores, dim=1).numpy()
        w_jax = np.asarray(validation_trust(jnp.exp(jnp.asarray(L))))
        w_jax_same_p = np.asarray(validation_trust(p_ref.astype(np.float32)))
        p_rel = np.max(np.abs(p_ref - np.exp(L.astype(np.float64))) / np.exp(L.astype(np.float64)))
        info(
            f"S2 P rel. diff 2.71828**L vs exp(L) [{name}]", p_rel, "reference writes e as 2.71828"
        )
        record(f"S2 W, same P [{name}]", np.abs(w_ref - w_jax_same_p).max(), 1e-6)
        record(
            f"S2 W, ref P=2.71828**L vs JAX P=exp(L) [{name}]", np.abs(w_ref - w_jax).max(), 1e-4
        )
        for variant, fn, opts in (
            ("top-k=3", lambda s: REF.fn("__top_k")(s.clone(), 3), {"top_peers": 3}),
            (
                "thresh -30",
                lambda s: REF.fn("__threshold")(s.clone(), -30),
                {"threshold": -30.0, "min_keep": 2},
            ),
        ):
            w_ref_v = fn(scores).numpy()
            w_jax_v = np.asarray(validation_trust(p_ref.astype(np.float32), **opts))
            note = "tie at the k-th score" if "tied" in name and variant.startswith("top") else ""
            record(f"S2 W {variant}, same P [{name}]", np.abs(w_ref_v - w_jax_v).max(), 1e-6, note)
        w_loss = np.asarray(validation_trust(jnp.exp(jnp.asarray(L)), use_loss=True))
        info(
            f"S2 W JAX use_loss=True vs ref (perplexity) [{name}]",
            np.abs(w_ref - w_loss).max(),
            "off by default; not the reference",
        )

    # ---------------------------------------------------------------- S3 rule level
    print("\n== S3 `dynamic-token` (top-100 logit L1), rule level ==")

    class LogitStub:
        def __init__(self, batches):
            self.batches, self.calls, self.training = batches, 0, True

        def eval(self):
            self.training = False
            return self

        def train(self, mode=True):
            self.training = mode
            return self

        def __call__(self, x, targets=None, get_logits=False):
            out = self.batches[self.calls % len(self.batches)].clone()
            self.calls += 1
            return {"logits": out, "loss": None}

    V, Bs = 512, 4
    ref_arr = np.zeros(64, np.int64)
    feeder.register(ref_arr, lambda k: (np.zeros((Bs, T), np.int64), np.zeros((Bs, T), np.int64)))

    def s3_case(name, logits, dtype="float32", tol=2e-5):
        """logits: float array [N, 4, Bs, V] (4 reference batches)."""
        stubs = []
        for j in range(N):
            t = torch.from_numpy(np.ascontiguousarray(logits[j], np.float32))
            if dtype == "bfloat16":
                t = t.to(torch.bfloat16)
            stubs.append([LogitStub([t[k][:, None, :] for k in range(4)]), None, None])
        try:
            with quiet():
                scores = REF.fn("__trust_weights_token")(
                    stubs, {"ref": ref_arr}, T, Bs, nullcontext(), ref_args
                )
        except Exception as e:  # noqa: BLE001
            record(f"S3 W [{name}]", float("nan"), tol, f"reference raised {type(e).__name__}: {e}")
            return
        w_ref = F.softmax(scores.float(), dim=1).numpy()
        as_f32 = logits.astype(np.float32)
        if dtype == "bfloat16":
            as_f32 = torch.from_numpy(as_f32).to(torch.bfloat16).float().numpy()
        jl = jnp.asarray(as_f32.reshape(N, 4 * Bs, V))
        w_jax = np.asarray(prediction_trust(jl, top_k=100, scale=10.0))
        d_ref = -scores.float().numpy() / 10.0
        # bf16: the reference's GPU autocast path, fedjax_lora computes in float32 (by design)
        out = record if dtype == "float32" else lambda q, d, _: info(q, d, "by design: bf16")
        out(f"S3 row-normalised D [{name}]", np.abs(d_ref - d_from_jax(jl)).max(), tol)
        out(f"S3 W [{name}]", np.abs(w_ref - w_jax).max(), tol)
        for variant, fn, opts in (
            ("top-k=3", lambda s: REF.fn("__top_k")(s.float().clone(), 3), {"top_peers": 3}),
            (
                "thresh -50",
                lambda s: REF.fn("__threshold")(s.float().clone(), -50),
                {"threshold": -50.0, "min_keep": 2},
            ),
        ):
            w_ref_v = fn(scores).numpy()
            w_jax_v = np.asarray(prediction_trust(jl, top_k=100, scale=10.0, **opts))
            if dtype != "float32":
                out(f"S3 W {variant} [{name}]", np.abs(w_ref_v - w_jax_v).max(), tol)
                continue
            same = compare_selection(
                f"S3 [{name}, {variant}]", scores.float().numpy(), w_ref_v, w_jax_v
            )
            record(
                f"S3 W {variant} [{name}]{'' if same.all() else ', rows with the same selection'}",
                np.abs(w_ref_v - w_jax_v)[same].max(initial=0.0),
                tol,
            )

    def d_from_jax(jl):
        # fedjax_lora's own steps 1-3 (prediction_trust before the softmax), via its scores
        from fedjax_lora.aggregation.trust import _sparsify_top_k

        sparse = _sparsify_top_k(jl, 100)
        d = jnp.abs(sparse[:, None] - sparse[None]).sum(axis=(2, 3)) / sparse.shape[1]
        return np.asarray(d / jnp.maximum(d.sum(1, keepdims=True), 1e-12))

    base_logits = 3.0 * rng.standard_normal((N, 4, Bs, V))
    s3_case("random logits V=512", base_logits)
    s3_case("GPT-2-like negative logits (mean -30)", base_logits - 30.0)
    s3_case("ties at the 100th value (logits on a 0.5 grid)", np.round(base_logits * 2) / 2)
    dup = base_logits.copy()
    dup[2] = dup[1]
    s3_case("duplicate clients 1=2 (tie for top-k)", dup)
    s3_case("all clients identical (D = 0)", np.broadcast_to(base_logits[:1], base_logits.shape))
    with_zero = base_logits.copy()
    top = np.argsort(-with_zero, axis=-1)[..., :5]
    np.put_along_axis(with_zero, top, 0.0, axis=-1)  # exact zeros among the kept top-100
    s3_case("exact zeros inside the top-100", with_zero)
    s3_case(
        "bf16-rounded logits given as f32",
        torch.from_numpy(base_logits.astype(np.float32)).to(torch.bfloat16).float().numpy(),
    )
    s3_case(
        "bf16 logits (GPU autocast path) vs JAX f32 of same values",
        base_logits - 30.0,
        dtype="bfloat16",
        tol=2e-5,
    )

    # ---------------------------------------------------------------- pipelines with real models
    print("\n== S2 / S3 pipelines on real models (tiny GPT-2, same base, same adapters) ==")
    T, B = 16, 4
    arrays = adapters("random")
    for name in arrays:
        if name.endswith("lora_B"):
            arrays[name] *= 0.1  # keep perplexity gaps of a few units (softmax not one-hot)
    stacked = stacked_from_ref_names(template, arrays)
    copy_adapters_to_ref(arrays, models)
    streams = markov_streams(N, 2, 2000, cfg.vocab, args.seed)
    windows = np.stack(
        [
            np.stack([s[o : o + T + 1] for o in rng.integers(0, len(s) - T - 1, size=12 * B)])
            for s in streams
        ]
    ).astype(np.int32)
    val_arrays = []
    for i in range(N):
        arr = np.asarray(streams[i])
        feeder.register(arr, window_provider(windows[i], B))
        val_arrays.append(arr)
    with quiet():
        scores = REF.fn("__trust_weights_ref")(
            clients, {"val": val_arrays}, T, B, nullcontext(), ref_args
        )
    p_ref = -scores.numpy().astype(np.float64)
    cross = make_cross_eval(graphdef, B, Strategy("map"))
    es = make_eval_set(windows, np.ones(windows.shape[:2], bool), B)
    p_jax = np.asarray(jax.jit(cross.perplexity)(stacked, es, base), np.float64)
    info(
        "S2 pipeline: P range (ref)",
        p_ref.max() - p_ref.min(),
        f"P in [{p_ref.min():.2f}, {p_ref.max():.2f}]",
    )
    record(
        "S2 pipeline: P rel. diff (eval-mode merged LoRA + 2.71828 vs unmerged + exp)",
        np.max(np.abs(p_ref - p_jax) / p_jax),
        1e-4,
    )
    w_ref = F.softmax(scores, dim=1).numpy()
    record("S2 pipeline: W", np.abs(w_ref - np.asarray(validation_trust(p_jax))).max(), 1e-3)
    cap = Capture(REF)
    try:
        REF.fn("__weighted_average")(clients, F.softmax(scores, dim=1), ref_args)
    finally:
        cap.close()
    mixed_jax = jax_adapters(mix(stacked, validation_trust(p_jax)))
    record("S2 pipeline: mixed adapters", max_abs_diff(ref_adapters(models), mixed_jax), 1e-4)

    copy_adapters_to_ref(arrays, models)
    S = 4 * B
    refwin = windows[0, :S, :T]  # reference sequences [S, T]
    ref_stream = np.zeros(64, np.int64)
    feeder.register(
        ref_stream, window_provider(np.concatenate([refwin, np.zeros((S, 1), refwin.dtype)], 1), B)
    )
    with quiet():
        scores = REF.fn("__trust_weights_token")(
            clients, {"ref": ref_stream}, T, B, nullcontext(), ref_args
        )
    logits = jax.jit(cross.reference_logits)(stacked, jnp.asarray(refwin), base)
    d_ref = -scores.numpy() / 10.0
    record("S3 pipeline: row-normalised D", np.abs(d_ref - d_from_jax(logits)).max(), 1e-5)
    record(
        "S3 pipeline: W",
        np.abs(F.softmax(scores, 1).numpy() - np.asarray(prediction_trust(logits))).max(),
        1e-5,
    )

    # ---------------------------------------------------------------- HEAD dispatch
    print("\n== HEAD `aggregate()` dispatch (reference-side) ==")
    copy_adapters_to_ref(arrays, models)
    feeder.reset_counts()
    cap = Capture(REF, mix=False)
    try:
        for trust in ("dynamic-ref", "dynamic-token"):
            REF.strategies.aggregate(
                clients,
                trust,
                {"val": val_arrays, "ref": ref_stream},
                T,
                B,
                nullcontext(),
                ref_args,
            )
    finally:
        cap.close()
    raw = ref_scores_weights().numpy()
    for trust, w in zip(("dynamic-ref", "dynamic-token"), cap.mats, strict=True):
        info(
            f"HEAD aggregate('{trust}') W vs raw cosine S (no softmax)",
            np.abs(w - raw).max(),
            f"row sums {w.sum(1).min():.3f}..{w.sum(1).max():.3f}; "
            f"val/ref batches drawn: {sum(e[2] for e in feeder._entries.values())}",
        )
    feeder.restore()
    finish(args)


def finish(args):
    print(f"\nwritten {R.save(args.out_dir)}")


if __name__ == "__main__":
    main()
