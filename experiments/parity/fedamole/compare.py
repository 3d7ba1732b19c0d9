"""Compares OUT_DIR/results/ref_* with jax_* and writes results/parity.md, parity.json and the
checks `OUT_DIR/parts/fedamole.json` (see ../results.py).

Runs in either venv (NumPy only). Sections whose files are missing are skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import common
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import Results  # noqa: E402

ROWS: list[dict] = []
# issue 14 points whose fedjax_lora switch the JAX side did not find ({point: what is missing});
# filled from jax_data.json / the trajectory files
MISSING: dict[int, str] = {}
INFO: list[tuple[str, float, str]] = []  # documented differences and options, not checks


def add(section, quantity, diff, tol, note="", scale=None, point=None):
    """`diff` a number (max abs difference, or a count when `tol` is 0); `point`: the issue-14
    point whose switch this comparison needs."""
    diff = float(diff)
    ok = diff <= tol
    ROWS.append(
        dict(
            section=section,
            quantity=quantity,
            max_abs_diff=diff,
            tol=tol,
            scale=None if scale is None else float(scale),
            verdict="match" if ok else "DIFFERS",
            note=note,
            point=point,
        )
    )


def save_results() -> Path:
    R = Results("fedamole")
    for row in ROWS:
        name = f"({row['section']}) {row['quantity']}"
        if row["point"] in MISSING:
            R.missing(name, MISSING[row["point"]], row["tol"])
            R.info(name, row["max_abs_diff"], f"without the switch: {row['note']}")
        else:
            R.check(name, row["max_abs_diff"], row["tol"], row["note"])
    for name, value, note in INFO:
        R.info(name, value, note)
    return R.save(common.out_dir())


def maxdiff(pairs):
    d, s = 0.0, 0.0
    for a, b in pairs:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (a.shape, b.shape)
        if a.size:
            d = max(d, float(np.max(np.abs(a - b))))
            s = max(s, float(np.max(np.abs(a))))
    return d, s


def have(*names):
    return all((common.results() / n).exists() for n in names)


def layer():
    r, j = common.load_npz("ref_layer.npz"), common.load_npz("jax_layer.npz")
    cases = sorted({k.split("_")[0] for k in r})
    spec = [
        ("logits", "router logits <A_e x, W_tok x>/sqrt(r) over held experts", 1e-5),
        ("probs", "softmax over held experts", 1e-6),
        ("gates_full", "top-2 renormalised gates (per expert id)", 1e-6),
        ("lb", "load-balancing loss x 0.001", 1e-8),
        ("token_embs", "token embeddings W_tok x", 1e-5),
        ("expert_embs", "expert embeddings A_e x (held)", 1e-5),
        ("y", "layer output W0 x + shared + routed", 1e-5),
        ("gA", "grad A_e (held)", 1e-4),
        ("gB", "grad B_e (held)", 1e-4),
        ("gsA", "grad shared A", 1e-4),
        ("gsB", "grad shared B", 1e-4),
        ("gW", "grad W_tok", 1e-4),
    ]
    for key, what, tol in spec:
        d, s = maxdiff((r[f"{c}_{key}"], j[f"{c}_{key}"]) for c in cases)
        add("a: AMoLE layer", what, d, tol, f"{len(cases)} cases (2,3,4,6 of 6 held)", s)
    nonheld = max(float(j[f"{c}_probs_nonheld_max"]) for c in cases)
    nonheld_g = max(float(j[f"{c}_nonheld_max"]) for c in cases)
    add(
        "a: AMoLE layer",
        "non-held experts: prob and grad (JAX only; exactly 0 wanted)",
        max(nonheld, nonheld_g),
        0.0,
    )


def model():
    r, j = common.load_npz("ref_model.npz"), common.load_npz("jax_model.npz")
    add(
        "a: whole model",
        "logits [2,24,512] (tiny Llama, AMoLE on 4 q/v modules)",
        *maxdiff([(r["logits"], j["logits"])])[:1],
        1e-5,
        scale=np.abs(r["logits"]).max(),
    )
    add(
        "a: whole model",
        "CE on response tokens",
        abs(float(r["ce"]) - float(j["ce"])),
        1e-6,
        scale=float(r["ce"]),
    )
    add(
        "a: whole model",
        "0.001 x sum over modules of LB loss",
        abs(float(r["lb"]) - float(j["lb"])),
        1e-8,
        scale=float(r["lb"]),
    )
    keys = [k for k in r if "|g" in k]
    d, s = maxdiff((r[k], j[k]) for k in keys)
    add("a: whole model", "grads of CE + 0.001 sum LB (all adapters)", d, 1e-5, scale=s)
    nonheld = max(float(j[k]) for k in j if k.endswith("nonheld_max"))
    add("a: whole model", "grads of non-held experts (JAX; exactly 0 wanted)", nonheld, 0.0)


def rsea():
    r, j = common.load_npz("ref_rsea.npz"), common.load_npz("jax_rsea.npz")
    groups = {
        "t": "client mean token embedding t_c (aux set, local params)",
        "u": "client mean expert embeddings u_ce (held)",
        "keys": "expert keys u_e = mean over holders",
        "P": "scores softmax_c(u T^T / sqrt r), end to end",
    }
    for g, what in groups.items():
        ks = [k for k in r if k.split("|")[1] == g]
        d, s = maxdiff((r[k], j[k]) for k in ks)
        add("b: RSEA", what, d, 1e-5 if g != "P" else 1e-6, "4 clients, E=8, 4 modules", s)
    ks = [k for k in r if k.endswith("|P")]
    d, s = maxdiff((r[k], j[k.removesuffix("|P") + "|P_from_ref_stats"]) for k in ks)
    add("b: RSEA", "scores from the reference's uploaded stats", d, 1e-6, scale=s)
    mism = sum(int(np.any(r[k] != j[k])) for k in r if k.endswith("|X"))
    add("b: RSEA", "assignment X end to end (modules differing)", mism, 0, f"of {len(ks)}")
    mism = sum(
        int(np.any(r[k] != j[k.removesuffix("|X") + "|X_from_ref_P"]))
        for k in r
        if k.endswith("|X")
    )
    add("b: RSEA", "assignment X from the reference's P (modules differing)", mism, 0)
    for g, what in (
        ("aggA", "A_e"),
        ("aggB", "B_e"),
        ("aggsA", "shared A"),
        ("aggsB", "shared B"),
        ("aggW", "W_tok"),
    ):
        ks = [k for k in r if k.endswith("|" + g)]
        d, s = maxdiff((r[k], j[k]) for k in ks)
        add("c: aggregation", f"holder-averaged {what}", d, 1e-6, "Server.aggregate", s)


def assign():
    r, j = common.load_npz("ref_assign.npz"), common.load_npz("jax_assign.npz")
    insts = common.assign_instances()
    xr = common.to_list_of_arrays(r["X"], r["offsets"])
    xj = common.to_list_of_arrays(j["X"], j["offsets"])
    add(
        "b: assignment",
        "objective sum P.X, rsea.assign (HiGHS LP) vs SCIP ILP",
        np.max(np.abs(r["obj"] - j["obj"])),
        1e-9,
        f"{len(insts)} instances, 5 configs incl. homo_arch",
    )
    add(
        "b: assignment",
        "instances with a different X (ties allowed)",
        sum(int(np.any(a != b)) for a, b in zip(xr, xj, strict=True)),
        len(insts),
    )
    bad = 0
    for inst, x in zip(insts, xj, strict=True):
        x = x.reshape(inst["E"], inst["C"])
        cols = x.sum(0)
        bad += int(
            np.any(x.sum(1) != inst["k"]) or cols.min() < inst["lo"] or cols.max() > inst["hi"]
        )
    add("b: assignment", "JAX solutions violating constraints", bad, 0)
    ROWS[-1]["note"] = (
        f"solve time mean: SCIP {np.mean(r['seconds']) * 1e3:.1f} ms, "
        f"HiGHS {np.mean(j['seconds']) * 1e3:.1f} ms"
    )


def data():
    r, j = common.load_npz("ref_data.npz"), common.load_npz("jax_data.npz")
    rm, jm = common.load_json("ref_data.json"), common.load_json("jax_data.json")
    MISSING.update({int(k): v for k, v in jm.get("switches", {}).items()})
    add(
        "d: partition",
        "Dolly label encoding (rows differing)",
        int(np.sum(r["labels_dolly"] != j["labels_dolly"])),
        0,
    )
    for ds, label, point in (
        ("dolly", "Dolly (8 categories)", None),
        ("snli", "SNLI-like (0.2% label -1; issue 14 point 9)", 9),
        ("snliraw", "SNLI-like, partition.dirichlet alone as the reference calls it", None),
    ):
        exact = sets = total = 0
        for seed in (42, 62, 82):
            for alpha in (0.1, 1.0, 100.0):
                k = f"{'snli' if ds == 'snliraw' else ds}_{seed}_{alpha}"
                rp = common.to_list_of_arrays(r[f"part_{k}"], r[f"off_{k}"])
                jk = f"snliraw_{k}" if ds == "snliraw" else k
                jp = common.to_list_of_arrays(j[f"part_{jk}"], j[f"off_{jk}"])
                total += 1
                exact += all(
                    len(a) == len(b) and np.all(a == b) for a, b in zip(rp, jp, strict=True)
                )
                sets += all(set(a.tolist()) == set(b.tolist()) for a, b in zip(rp, jp, strict=True))
        add(
            "d: partition",
            f"{label}: same seed -> same client index lists (configs differing)",
            total - exact,
            0,
            f"{exact}/{total} identical incl. order, {sets}/{total} same sets; "
            "seeds 42/62/82 x alpha 0.1/1/100, 10 clients",
            point=point,
        )
    for ds in ("dolly", "snli"):
        differing = total = 0
        for seed in (42, 62, 82):
            for alpha in (0.1, 1.0, 100.0):
                for name in ("train", "aux", "val", "test"):
                    k = f"{name}_{ds}_{seed}_{alpha}"
                    total += 1
                    if f"split_{k}" not in j:
                        differing += 1
                        continue
                    rp = common.to_list_of_arrays(r[f"split_{k}"], r[f"splitoff_{k}"])
                    jp = common.to_list_of_arrays(j[f"split_{k}"], j[f"splitoff_{k}"])
                    differing += not all(
                        len(a) == len(b) and np.all(a == b) for a, b in zip(rp, jp, strict=True)
                    )
        add(
            "d: splits",
            f"{ds}: per-client split membership train/aux/val/test, same seed "
            "(configs x splits differing; issue 14 point 9)",
            differing,
            0,
            f"of {total}; aux = 5 % of train+aux (4 % of a client's examples), capped at 200",
            point=9,
        )
    for ds in ("dolly", "snli"):
        dv = dt = dtr = 0
        for seed in (42, 62, 82):
            for alpha in (0.1, 1.0, 100.0):
                rs, js = r[f"sizes_{ds}_{seed}_{alpha}"], j[f"sizes_{ds}_{seed}_{alpha}"]
                dtr = max(dtr, int(np.max(np.abs(rs[:, 0] + rs[:, 1] - js[:, 0]))))
                dv = max(dv, int(np.max(np.abs(rs[:, 2] - js[:, 1]))))
                dt = max(dt, int(np.max(np.abs(rs[:, 3] - js[:, 2]))))
        add(
            "d: splits",
            f"{ds}: per-client split sizes on the same partition (train+aux / val "
            "/ test), examples",
            max(dtr, dv, dt),
            2,
            f"max diff train+aux {dtr}, val {dv}, test "
            f"{dt}; which examples land in which split differs (other RNG, no 2nd shuffle)",
        )
    n_d = len(jm["dolly_prompts"])
    add(
        "e: templates",
        f"Alpaca prompts (of {n_d}) differing",
        sum(a != b for a, b in zip(rm["dolly_sources"], jm["dolly_prompts"], strict=True)),
        0,
    )
    add(
        "e: templates",
        "targets: reference text == response + eos string (differing)",
        sum(
            a != b + common.SPECIALS[1]
            for a, b in zip(rm["dolly_targets"], jm["dolly_targets"], strict=True)
        ),
        0,
    )
    add(
        "e: templates",
        f"SNLI prompts (of {len(jm['snli_prompts'])}) differing",
        sum(a != b for a, b in zip(rm["snli_sources"], jm["snli_prompts"], strict=True)),
        0,
    )
    add(
        "e: templates",
        "SNLI choice tokens (+EOS) scored in eval, differing",
        int(rm["snli_choice_ids"] != jm["snli_choice_ids"]),
        0,
    )
    max_len = rm["model_max_length"]
    for ds in ("dolly", "snli"):
        ri = common.to_list_of_arrays(r[f"{ds}_input_ids"], r[f"{ds}_input_ids_off"])
        rl = common.to_list_of_arrays(r[f"{ds}_labels"], r[f"{ds}_labels_off"])
        ji = common.to_list_of_arrays(j[f"{ds}_ids"], j[f"{ds}_ids_off"])
        jmask = common.to_list_of_arrays(j[f"{ds}_mask"], j[f"{ds}_ids_off"])
        short = [i for i in range(len(ji)) if len(ji[i]) <= max_len]
        ids_bad = sum(int(len(ri[i]) != len(ji[i]) or np.any(ri[i] != ji[i])) for i in short)
        mask_bad = sum(
            int(len(rl[i]) != len(jmask[i]) or np.any((rl[i] != -100) != (jmask[i] > 0)))
            for i in short
        )
        long = len(ji) - len(short)
        add(
            "e: loss mask",
            f"{ds}: token ids [bos] prompt target eos (examples differing)",
            ids_bad,
            0,
            f"{len(short)} examples <= {max_len} tokens",
        )
        add(
            "e: loss mask",
            f"{ds}: counted positions = target + EOS (examples differing)",
            mask_bad,
            0,
            f"{long} longer examples: reference truncates to {max_len} and forces "
            "EOS last; fedjax_lora keeps them whole (windows)",
        )
    ri = common.to_list_of_arrays(r["dolly_input_ids"], r["dolly_input_ids_off"])
    rl = common.to_list_of_arrays(r["dolly_labels"], r["dolly_labels_off"])
    ref_kept = np.flatnonzero(r["dolly_source_lens"] < max_len)  # ClientDataLoader's filter
    if "rows_kept" in j:
        ji = common.to_list_of_arrays(j["rows_ids"], j["rows_off"])
        jmask = common.to_list_of_arrays(j["rows_mask"], j["rows_off"])
        kept_same = np.array_equal(ref_kept, j["rows_kept"])
        bad = len(ref_kept) if not kept_same else 0
        if kept_same:
            for row, i in enumerate(ref_kept):
                a, b, m = ri[i], ji[row], jmask[row]
                bad += int(len(a) != len(b) or np.any(a != b) or np.any((rl[i] != -100) != (m > 0)))
        long = int(sum(len(ri[i]) >= max_len for i in ref_kept))
        add(
            "e: example rows",
            "dolly: every example as one row, truncated with EOS forced, long prompts dropped "
            "(examples differing; issue 14 point 6)",
            bad,
            0,
            f"{len(ref_kept)} kept of {len(ri)}, {long} cut to {max_len}; tokenize_example_rows "
            "vs CausalLMPreprocessor + ClientDataLoader's filter",
            point=6,
        )
    else:
        add("e: example rows", "dolly: one example per row (issue 14 point 6)", 1, 0, point=6)
    kinds = common.ROUGE_KINDS
    d = r["rouge_ids"] - j["rouge_ids"]
    per = "; ".join(
        f"{k} {r['rouge_ids'][i :: len(kinds)].mean():.3f}/"
        f"{j['rouge_ids'][i :: len(kinds)].mean():.3f}"
        for i, k in enumerate(kinds)
    )
    add(
        "f: ROUGE-L",
        "per-example ROUGE-L F of identical texts (reference's pip rouge vs rouge_l)",
        np.max(np.abs(d)),
        1e-6,
        f"mean ref {r['rouge_ids'].mean():.4f} vs jax "
        f"{j['rouge_ids'].mean():.4f}; by kind ref/jax: {per}",
        point=7,
    )
    add(
        "f: ROUGE-L",
        "per-example ROUGE-L F of identical raw strings (pip rouge vs rouge_l)",
        np.max(np.abs(r["rouge_str"] - j["rouge_str"])),
        1e-6,
        point=7,
    )
    if "rouge_score_ids" in j:
        INFO.append(
            (
                "f: ROUGE-L, rouge_l(implementation='rouge-score') vs the reference's pip rouge",
                np.max(np.abs(r["rouge_ids"] - j["rouge_score_ids"])),
                f"the option; means {r['rouge_ids'].mean():.4f} (rouge) vs "
                f"{j['rouge_score_ids'].mean():.4f} (rouge-score)",
            )
        )


def traj_rows(dispatch: str):
    sec = f"2: trajectory ({dispatch})"
    r = common.load_npz(f"ref_traj_{dispatch}.npz")
    j = common.load_npz(f"jax_traj_{dispatch}_map.npz")
    if not bool(j.get("response_only_eval", False)):
        MISSING[8] = "eval_windows(..., masked=True) (issue 14 point 8)"
    point = 6 if dispatch.endswith("examples") else None
    add(sec, "batch order used (examples differing)", int(np.sum(r["order"] != j["order"])), 0)
    add(
        sec,
        "initial pool + round-0 assignment loaded (max diff)",
        maxdiff([(r[k], j[k]) for k in r if k.startswith("init|")])[0],
        0.0,
    )
    d, s = maxdiff([(r["ce"], j["ce"])])
    add(sec, "per-step CE (3 clients x 2 rounds x 6 steps)", d, 1e-5, scale=s, point=point)
    if dispatch.startswith("static"):
        d, s = maxdiff([(r["eval_loss_init"], j["eval_loss_init"])])
        add(
            sec,
            "eval loss of the same example, response tokens (Client.eval vs engine val window; "
            "issue 14 point 8)",
            d,
            1e-5,
            f"ref {np.round(r['eval_loss_init'], 4).tolist()} (response tokens) vs jax "
            f"{np.round(j['eval_loss_init'], 4).tolist()}",
            s,
            point=8,
        )
    d, s = maxdiff([(r["loss"], j["loss"])])
    add(sec, "per-step CE + 0.001 sum LB", d, 1e-5, scale=s, point=point)
    for rnd in sorted({k.split("|")[0] for k in r if k.startswith("dispatch")}):
        ks = [k for k in r if k.startswith(rnd + "|") and k.endswith("|P")]
        d, s = maxdiff((r[k], j[k]) for k in ks)
        add(
            sec,
            f"RSEA scores after round {rnd.removeprefix('dispatch')} (trained, aux stats)",
            d,
            1e-5,
            scale=s,
        )
        mism = sum(int(np.any(r[k[:-2] + "|X"] != j[k[:-2] + "|X"])) for k in ks)
        add(
            sec,
            f"RSEA assignment for round {int(rnd.removeprefix('dispatch')) + 1} "
            "(modules differing)",
            mism,
            0,
            f"of {len(ks)}",
        )
    vmap = common.results() / f"jax_traj_{dispatch}_vmap.npz"
    jv = common.load_npz(vmap.name) if vmap.exists() else None
    for rnd in sorted({k.split("|")[0] for k in r if k.startswith("agg")}):
        ks = [k for k in r if k.startswith(rnd + "|")]
        d, s = maxdiff((r[k], j[k]) for k in ks)
        upd = max(float(np.max(np.abs(r[k] - r["init|" + k.split("|", 1)[1]]))) for k in ks)
        note = f"update size max|agg - init| {upd:.3g}; diff/update {d / upd:.1e}"
        if jv is not None:
            dv = maxdiff((j[k], jv[k]) for k in ks)[0]
            note += f"; JAX map vs vmap (float floor) {dv:.2g}"
        add(
            sec,
            f"aggregated adapters after round {rnd.removeprefix('agg')}",
            d,
            max(1e-5, 3e-3 * upd),
            note,
            s,
            point=point,
        )


def trajectory():
    for dispatch in ("static", "rsea", "static_examples"):
        if have(f"ref_traj_{dispatch}.npz", f"jax_traj_{dispatch}_map.npz"):
            traj_rows(dispatch)
    if have("traj_plan_examples.npz") and "order" not in common.load_npz("traj_plan_examples.npz"):
        MISSING.setdefault(6, "LocalTraining(packing='examples') (issue 14 point 6)")
        add("2: trajectory (static_examples)", "per-step CE", float("nan"), 1e-5, point=6)


def table() -> str:
    lines = [
        "| section | quantity | max abs diff | scale | tol | verdict | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        sc = "" if row["scale"] is None else f"{row['scale']:.3g}"
        lines.append(
            f"| {row['section']} | {row['quantity']} | {row['max_abs_diff']:.3g} | {sc} "
            f"| {row['tol']:g} | {row['verdict']} | {row['note']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    for name, fn, files in (
        ("layer", layer, ("ref_layer.npz", "jax_layer.npz")),
        ("model", model, ("ref_model.npz", "jax_model.npz")),
        ("rsea", rsea, ("ref_rsea.npz", "jax_rsea.npz")),
        ("assign", assign, ("ref_assign.npz", "jax_assign.npz")),
        ("data", data, ("ref_data.npz", "jax_data.npz")),
        ("trajectory", trajectory, ("traj_plan.npz",)),
    ):
        if have(*files):
            fn()
        else:
            print(f"(skipping {name}: missing {files})")
    md = table()
    (common.results() / "parity.md").write_text(md + "\n")
    common.save_json("parity.json", ROWS)
    print(md)
    print(json.dumps({"rows": len(ROWS), "differs": sum(r["verdict"] != "match" for r in ROWS)}))
    print(f"written {save_results()}")
