"""The papers' settings as named config presets: `preset: <name>` in a config (or
`fedjax-lora run CONFIG --preset <name>`) applies `PRESETS[name]` first, then the config's own
values, then the `--set` overrides.

A preset holds what a paper's method family runs with (rounds, LoRA, local training, optimizer
and schedule, dropout, evaluation) and never the model or data source, so it combines with any
of them. The values are the authors' scripts' (spec notes of each paper):

- `trust-weighted-paper`: Wagner, Fan & Jaggi (COLM 2024), `epfml/personalized-collaborative-llms`:
  LoRA r 4, α 32, `α/r`, dropout 0.1, A ~ kaiming-uniform with fan-in r, on `c_attn`, `attn.c_proj`,
  `mlp.c_fc`, `mlp.c_proj`; model dropout 0.2 (attention 0.2), exact GELU; 20 rounds × 25 steps of
  4 × 50 sequences of 512 tokens; AdamW (0.9, 0.95), wd 1e-3, lr 2e-3, one-cycle (2 % warm-up,
  div 100, final div 0.05) over 500 steps; aggregation from round 4 (step 100); evaluation with
  attention dropout 0.2 kept on, as the paper's perplexities and its S2/S3 trust inputs
  (`eval.attention_dropout`; `null` for the clean evaluation).
- `comigs-paper`: Fan, Messmer, Doikov & Jaggi (ICML 2025), `comigs-icml2025/codebase`: LoRA r 8,
  α 16, `α/√r` on the attention and MLP projections; 20 rounds × 10 steps of 64 × 128 tokens;
  AdamW (0.9, 0.95), wd 0.01, lr 2e-3 cosine to lr/10 over 200 steps; aggregation every round;
  every method evaluated on the local models before the server average (`fedavg` set here, the
  CoMiGS family by default).
- `fedamole-paper`: Zhang et al. (arXiv:2411.19128), `zyc140345/FedAMoLE`: LoRA r 8, α 16, dropout
  0.05 on `q_proj`/`v_proj`; 30 rounds × 200 steps of batch 1, 512 tokens; Adam lr 5e-5, eps 1e-6.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    "trust-weighted-paper": {
        "rounds": 20,
        "model": {"dropout": 0.2, "attn_dropout": 0.2, "activation": "gelu_erf"},
        "lora": {
            "targets": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
            "rank": 4,
            "alpha": 32.0,
            "scaling": "alpha/r",
            "dropout": 0.1,
            "init": "kaiming_uniform",
            "init_fan": "rank",
        },
        "training": {
            "steps": 25,
            "batch_size": 50,
            "grad_accum": 4,
            "seq_len": 512,
            "sampling": "random",
            "dropout": True,
        },
        "optimizer": {
            "name": "adamw",
            "lr": 2e-3,
            "schedule": "one_cycle",
            "total_steps": 500,
            "pct_start": 0.02,
            "div_factor": 100.0,
            "final_div_factor": 0.05,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 1e-3,
        },
        "trust": {"first_aggregation_round": 4, "top_k": 100, "scale": 10.0},
        "eval": {"attention_dropout": 0.2},
    },
    "comigs-paper": {
        "rounds": 20,
        "lora": {
            "targets": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
            "rank": 8,
            "alpha": 16.0,
            "scaling": "alpha/sqrt(r)",
            "dropout": 0.0,
            "init": "kaiming_uniform",
        },
        "training": {
            "steps": 10,
            "batch_size": 64,
            "seq_len": 128,
            "sampling": "random",
            "dropout": False,
        },
        "optimizer": {
            "name": "adamw",
            "lr": 2e-3,
            "schedule": "cosine",
            "total_steps": 200,
            "final_lr_fraction": 0.1,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.01,
        },
        "trust": {"first_aggregation_round": 1},
        "method_options": {"fedavg": {"evaluate": "local"}},
    },
    "fedamole-paper": {
        "rounds": 30,
        "lora": {"targets": ["q_proj", "v_proj"], "rank": 8, "alpha": 16.0, "dropout": 0.05},
        "training": {"steps": 200, "batch_size": 1, "seq_len": 512, "sampling": "random"},
        "optimizer": {"name": "adam", "lr": 5e-5, "b1": 0.9, "b2": 0.999, "eps": 1e-6},
    },
}
"""Config overrides per paper preset (module docstring), merged like a config file."""
