"""Reference side of the FedAMoLE parity tests: runs the authors' PyTorch code (imported at run time
from REF_DIR, never copied) on the common inputs and writes OUT_DIR/results/ref_*.npz|json.

  python ref_side.py layer model rsea assign data      # any subset of the sections

Hub-bound steps are redirected, not rewritten: `model.common.MODEL_NAME2ID["tiny"]` points at the
local fixture, `node.get_device` returns the CPU, and the pad-token resize
(`sync_model_with_tokenizer`) is skipped: the fixture tokenizer already has a pad token and a
smaller vocabulary than the model's embedding, which the resize would shrink.
Everything runs in float32 (`--precision fp32`) with LoRA dropout 0, so both sides are
deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import common
import numpy as np
import torch
from torch.overrides import TorchFunctionMode

common.ref_path()
import data.dataset as ref_dataset  # noqa: E402
import data.hete_partition as ref_partition  # noqa: E402
import data.preprocess as ref_preprocess  # noqa: E402
import data.prompt as ref_prompt  # noqa: E402
import evaluation as ref_evaluation  # noqa: E402
import model.common as ref_common  # noqa: E402
import model.mole.util as ref_util  # noqa: E402
import node  # noqa: E402
import optimize as ref_optimize  # noqa: E402

torch.set_num_threads(int(__import__("os").environ.get("TORCH_THREADS", "2")))
FIXTURE = common.fixtures() / "tiny_parity"


def make_args(**kw) -> argparse.Namespace:
    """main.py's defaults for what the exercised code reads, with the fixture model."""
    a = dict(
        model_name="tiny",
        precision="fp32",
        lora_rank=common.RANK,
        lora_alpha=common.ALPHA,
        lora_dropout=0.0,
        expert_num=common.LAYER_E,
        expert_choices=2,
        max_experts=8,
        load_balance_alpha=common.LB_COEF,
        top_k=common.TOP_K,
        random_dispatch=False,
        save_embs=False,
        save_dispatch=False,
        static_arch=False,
        homo_arch=False,
        apply_dp=False,
        dp_eta=100.0,
        lr=5e-5,
        lr_decay=0.99,
        batch_size=1,
        client_num=4,
        task_type="causal_lm",
        do_profile=False,
        gpu=0,
        max_length=1024,
        client_step=None,
        local_epochs=1,
        log_root=str(common.results()),
        client_dataset_name="dolly-15k",
    )
    a.update(kw)
    return argparse.Namespace(**a)


def install(model_dir=FIXTURE):
    ref_common.MODEL_NAME2ID["tiny"] = str(model_dir)
    node.get_device = lambda args: torch.device("cpu")
    node.sync_model_with_tokenizer = lambda model, tokenizer: None


def build_model(args):
    model = ref_common.get_model("tiny", args)
    ref_util.convert_to_mole(model, args)
    return model


class NullWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), int(step)))


def expert_state(name: str, a: np.ndarray, b: np.ndarray) -> dict:
    """One expert as the reference's per-expert state dict (`get_experts` layout)."""
    return {
        f"lora_A.{name}.weight": torch.tensor(a.copy()),
        f"lora_B.{name}.weight": torch.tensor(b.copy()),
    }


def client_experts(pools: dict, held: dict) -> tuple[dict, dict, dict]:
    """(experts, token_proj, expert_ids) of a client holding `held[module]` of `pools[module]`."""
    experts, token_proj, ids = {}, {}, {}
    for name, pool in pools.items():
        idx = np.flatnonzero(held[name]).tolist()
        experts[name] = [expert_state(f"expert_{i}", pool["A"][i], pool["B"][i]) for i in idx]
        experts[name].append(expert_state("expert_shared", pool["sA"], pool["sB"]))
        token_proj[name] = {"token_proj.weight": torch.tensor(pool["W"].copy())}
        ids[name] = idx + [len(pool["A"])]
    return experts, token_proj, ids


def load_client(model, args, pools, held):
    experts, token_proj, _ = client_experts(pools, held)
    ref_util.inject_experts(model, experts, args)
    ref_util.inject_token_proj(model, token_proj)
    ref_util.make_peft_params_as_trainable(model)


class Capture(TorchFunctionMode):
    """Records the router's softmax input/output, top-k and gathered (then renormalised) gates."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ("softmax", "topk", "gather"):
            self.log.append((name, args, out))
        return out


class Recorder:
    """Stands in for `TempAccumulator` on one module: keeps the raw LB loss and embeddings."""

    def __init__(self):
        self.lb, self.embs = [], []

    def add_load_balance_loss(self, loss):
        self.lb.append(loss)

    def add_embs(self, module_name, token_embs, expert_embs):
        self.embs.append((token_embs.detach().clone(), expert_embs.detach().clone()))


def grads_of(module, held_ids):
    g = lambda p: p.grad.detach().numpy().copy()
    return dict(
        gA=np.stack([g(module.lora_A[f"expert_{i}"].weight) for i in held_ids]),
        gB=np.stack([g(module.lora_B[f"expert_{i}"].weight) for i in held_ids]),
        gsA=g(module.lora_A["expert_shared"].weight),
        gsB=g(module.lora_B["expert_shared"].weight),
        gW=g(module.token_proj.weight),
    )


# ---------------------------------------------------------------------------------------------


def section_layer():
    """(a) one MoLELinear forward + backward per case."""
    args = make_args()
    model = build_model(args)
    out = {}
    for i, case in enumerate(common.layer_cases()):
        pools = common.model_pools(common.PARITY_MODEL, common.LAYER_E, case["pool_seed"])
        held = {n: case["held"] for n in pools}
        load_client(model, args, pools, held)
        module = model.get_submodule(case["module"])
        rec = Recorder()
        module.new_module.accumulator = rec
        x = torch.tensor(case["x"])
        with Capture() as cap:
            y = module(x)
        module.new_module.accumulator = None
        names = [n for n, _, _ in cap.log]
        assert names == ["softmax", "topk", "gather"], names
        logits = cap.log[0][1][0].detach().numpy()
        probs = cap.log[0][2].detach().numpy()
        chosen = cap.log[1][2][1].numpy()
        gates = cap.log[2][2].detach().numpy()  # renormalised in place by the forward
        held_ids = np.flatnonzero(case["held"])
        gates_full = np.zeros((logits.shape[0], common.LAYER_E), np.float32)
        np.put_along_axis(gates_full, held_ids[chosen], gates, axis=1)
        lb = rec.lb[0]
        loss = (y * torch.tensor(case["probe"])).sum() + common.LB_COEF * lb
        loss.backward()
        token_embs, expert_embs = rec.embs[0]
        res = dict(
            y=y.detach().numpy(),
            logits=logits,
            probs=probs,
            gates_full=gates_full,
            lb=lb.detach().numpy() * common.LB_COEF,
            token_embs=token_embs.numpy(),
            expert_embs=expert_embs.numpy(),
            **grads_of(module, held_ids),
        )
        out.update({f"c{i}_{k}": v for k, v in res.items()})
    common.save_npz("ref_layer.npz", **out)


def section_model():
    """(a) whole tiny Llama with AMoLE on every q/v: logits, CE, sum of LB losses, gradients."""
    args = make_args()
    model = build_model(args)
    case = common.model_case()
    pools = common.model_pools(common.PARITY_MODEL, common.LAYER_E, case["pool_seed"])
    load_client(model, args, pools, case["held"])
    acc = ref_util.TempAccumulator(model)
    model.eval()
    out = model(input_ids=torch.tensor(case["ids"]), labels=torch.tensor(case["labels"]))
    lb = acc.load_balance_loss
    total = out.loss + args.load_balance_alpha * lb
    total.backward()
    acc.unregister()
    res = dict(
        logits=out.logits.detach().numpy(),
        ce=out.loss.detach().numpy(),
        lb=(args.load_balance_alpha * lb).detach().numpy(),
    )
    for name in pools:
        for k, v in grads_of(model.get_submodule(name), np.flatnonzero(case["held"][name])).items():
            res[f"{name}|{k}"] = v
    common.save_npz("ref_model.npz", **res)


def section_rsea():
    """(b) client statistics (`Client.compute_embs`), server scoring + softmax over clients
    (`Server.dispatch_experts`) and SCIP assignment; (c) holder averaging (`Server.aggregate`)."""
    case = common.rsea_case()
    cfg = common.RSEA
    c_num, e_num = cfg["num_clients"], cfg["num_experts"]
    args = make_args(
        expert_num=e_num, expert_choices=cfg["k"], max_experts=cfg["hi"], client_num=c_num
    )
    model = build_model(args)
    names = list(case["pools"])
    clients = []
    out = {}
    for c in range(c_num):
        aux = [
            {
                "input_ids": torch.tensor(s)[None],
                "labels": torch.tensor(s)[None],
                "attention_mask": torch.ones(1, len(s), dtype=torch.long),
            }
            for s in case["aux"][c]
        ]
        client = node.Client(c, [], aux, [], [], None, NullWriter(), args)
        client.model = model
        held = {n: case["assign"][n][:, c] for n in names}
        client.experts, client.token_proj, client.expert_ids = client_experts(
            case["local"][c], held
        )
        client.load_model()
        client.compute_embs(1)
        client.release_model()
        for n in names:
            out[f"{n}|t|{c}"] = client.token_embs[n].numpy()[0]
            out[f"{n}|u|{c}"] = client.expert_embs[n].numpy()[:-1]  # drop the shared placeholder
        clients.append(client)
    server = node.Server.__new__(node.Server)
    server.args, server.lora_modules, server.clients = args, names, clients
    server.expert_ids, server.experts, server.token_proj = {}, {}, {}
    server.expert_embs, server.token_embs, server.expert_dispatch = {}, {}, {}
    for client in clients:
        client.server = server
    server.aggregate()
    for n in names:
        assert [int(i) for i in server.expert_ids[n]] == list(range(e_num + 1))
        experts = server.experts[n]
        out[f"{n}|aggA"] = np.stack([experts[i][f"lora_A.expert_{i}.weight"] for i in range(e_num)])
        out[f"{n}|aggB"] = np.stack([experts[i][f"lora_B.expert_{i}.weight"] for i in range(e_num)])
        out[f"{n}|aggsA"] = experts[e_num]["lora_A.expert_shared.weight"].numpy()
        out[f"{n}|aggsB"] = experts[e_num]["lora_B.expert_shared.weight"].numpy()
        out[f"{n}|aggW"] = server.token_proj[n]["token_proj.weight"].numpy()
        out[f"{n}|keys"] = server.expert_embs[n].numpy()
    calls = []
    original = node.optimize_expert_dispatch

    def recording(prob_gate, a):
        x = original(prob_gate, a)
        calls.append((prob_gate.copy(), np.rint(x).astype(bool)))
        return x

    node.optimize_expert_dispatch = recording
    try:
        server.dispatch_experts(1)
    finally:
        node.optimize_expert_dispatch = original
    for n, (p, x) in zip(names, calls, strict=True):
        out[f"{n}|P"], out[f"{n}|X"] = p, x
    common.save_npz("ref_rsea.npz", **out)


def section_assign():
    """(b) `optimize_expert_dispatch` (cvxpy + SCIP) on random score matrices."""
    insts = common.assign_instances()
    xs, objs, secs = [], [], []
    for inst in insts:
        args = make_args(expert_choices=inst["k"], max_experts=inst["hi"], homo_arch=inst["homo"])
        t = time.perf_counter()
        x = ref_optimize.optimize_expert_dispatch(inst["P"], args)
        secs.append(time.perf_counter() - t)
        x = np.rint(x).astype(bool)
        xs.append(x.ravel())
        objs.append(float(np.sum(inst["P"] * x)))
    flat, offsets = common.pack(xs)
    common.save_npz("ref_assign.npz", X=flat, offsets=offsets, obj=objs, seconds=secs)


class IndexSet:
    """The two members of `datasets.Dataset` that `split_dataset` uses, over an index list."""

    def __init__(self, idx):
        self.idx = np.asarray(idx)

    def __len__(self):
        return len(self.idx)

    def select(self, r):
        return IndexSet(self.idx[r.start : r.stop])


SPLITS = ("train", "aux", "val", "test")


def split_ratios(eval_frac: float, test_frac: float) -> list[float]:
    """`load_dataset`'s per-client split ratios for ratio_train_to_aux "0.95,0.05" (spec §5.3)."""
    rs = [
        0.95,
        0.05,
        eval_frac / (1 - eval_frac - test_frac),
        test_frac / (1 - eval_frac - test_frac),
    ]
    return [r / sum(rs) for r in rs]


def section_data():
    """(d) Dirichlet partition + per-client splits, (e) templates + loss masks, (f) ROUGE-L."""
    from sklearn.preprocessing import LabelEncoder

    install()
    fx = common.fixtures()
    dolly = common.read_jsonl(fx / "dolly.jsonl")
    snli = common.read_jsonl(fx / "snli.jsonl")
    res, meta = {}, {}
    # (d) partitions, exactly as ClientDataLoader: set_seed(seed), num_classes = #unique labels
    snli_eval = 10000 / (550152 + 10000 + 10000)
    datasets = {
        "dolly": (
            LabelEncoder().fit_transform([r["category"] for r in dolly]),
            split_ratios(0.1, 0.1),
            50,
        ),
        "snli": (np.array([r["label"] for r in snli]), split_ratios(snli_eval, snli_eval), 200),
    }
    for dname, (y, ratios, test_cap) in datasets.items():
        res[f"labels_{dname}"] = y
        for seed in (42, 62, 82):
            for alpha in (0.1, 1.0, 100.0):
                np.random.seed(seed)
                __import__("random").seed(seed)
                parts = ref_partition.partition_idx_dir(y, 10, alpha, np.unique(y).shape[0])
                flat, off = common.pack(parts)
                res[f"part_{dname}_{seed}_{alpha}"], res[f"off_{dname}_{seed}_{alpha}"] = flat, off
                sizes, members = [], {name: [] for name in SPLITS}
                for part in parts:
                    np.random.shuffle(part)
                    pieces = ref_dataset.split_dataset(IndexSet(part), ratios)
                    n = lambda s: 0 if s is None else len(s)
                    tr, aux, ev, te = pieces
                    sizes.append([n(tr), min(n(aux), 200), min(n(ev), 200), min(n(te), test_cap)])
                    for name, piece, cap in zip(
                        SPLITS, pieces, (None, 200, 200, test_cap), strict=True
                    ):
                        idx = np.zeros(0, np.int64) if piece is None else piece.idx[:cap]
                        members[name].append(np.asarray(idx, np.int64))
                res[f"sizes_{dname}_{seed}_{alpha}"] = np.array(sizes)
                for name in SPLITS:  # which examples each client's splits hold
                    key = f"{name}_{dname}_{seed}_{alpha}"
                    res[f"split_{key}"], res[f"splitoff_{key}"] = common.pack(members[name])
    # (e) templates and loss masks through the reference tokenizer and preprocessors
    args = make_args(model_name="tiny")
    tok = ref_common.get_tokenizer(args)
    meta["model_max_length"] = tok.model_max_length
    rows = dolly[:600]
    batch = {k: [r[k] for r in rows] for k in ("instruction", "context", "response")}
    sources, targets = ref_prompt.AlpacaTemplate(tok).get_prompt(batch)
    meta["dolly_sources"], meta["dolly_targets"] = sources, targets
    enc = ref_preprocess.CausalLMPreprocessor("dolly-15k", tok)(batch)
    for key in ("input_ids", "labels"):
        res[f"dolly_{key}"], res[f"dolly_{key}_off"] = common.pack(enc[key])
    res["dolly_source_lens"] = np.array(enc["source_lens"])
    rows = [r for r in snli if r["label"] >= 0][:300]
    batch = {
        "premise": [r["premise"] for r in rows],
        "hypothesis": [r["hypothesis"] for r in rows],
        "class": [r["label"] for r in rows],
    }
    sources, targets = ref_prompt.SNLITemplate(tok, train=True).get_prompt(batch)
    meta["snli_sources"], meta["snli_targets"] = sources, targets
    enc = ref_preprocess.CausalLMPreprocessor("snli", tok)(batch)
    for key in ("input_ids", "labels"):
        res[f"snli_{key}"], res[f"snli_{key}_off"] = common.pack(enc[key])
    cls = ref_preprocess.ClsLMPreprocessor("snli", tok)({k: v[:1] for k, v in batch.items()})
    meta["snli_choice_ids"] = [
        [t for t in lab if t != -100] for lab in cls["labels"][0]
    ]  # per choice: the tokens whose loss is scored (choice + EOS)
    # (f) ROUGE-L: the reference's scorer on token ids (decode + pip `rouge`) and on raw strings
    pairs = common.rouge_pairs()
    scores_ids, scores_str = [], []
    for hyp, ref in pairs:
        h = torch.tensor(tok(hyp, add_special_tokens=False)["input_ids"])
        r = torch.tensor(tok(ref + tok.eos_token, add_special_tokens=False)["input_ids"])
        scores_ids.append(ref_evaluation.rouge_score([h], r[None], tok))
        try:
            scores_str.append(ref_evaluation._rouge.get_scores([hyp], [ref])[0]["rouge-l"]["f"])
        except ValueError:
            scores_str.append(0.0)
    res["rouge_ids"], res["rouge_str"] = np.array(scores_ids), np.array(scores_str)
    common.save_npz("ref_data.npz", **res)
    common.save_json("ref_data.json", meta)


SECTIONS = dict(
    layer=section_layer,
    model=section_model,
    rsea=section_rsea,
    assign=section_assign,
    data=section_data,
)

if __name__ == "__main__":
    install()
    for name in sys.argv[1:] or list(SECTIONS):
        t = time.perf_counter()
        SECTIONS[name]()
        print(json.dumps({"ref_section": name, "seconds": round(time.perf_counter() - t, 2)}))
