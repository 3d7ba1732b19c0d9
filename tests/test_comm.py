"""Communication accounting against hand counts on a tiny tree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lora import aggregation as agg
from fedjax_lora.models.layers import Expert, Router

N = 3
# One LoRA layer (d_in 8, rank 4, d_out 6) in f32, a bf16 router [5], and experts [N, E=3, 8, 2]
# (their roles are their variable types).
TREE = {
    "attn": {"a": jax.ShapeDtypeStruct((N, 8, 4), jnp.float32), "b": np.zeros((N, 4, 6))},
    "router": Router(jax.ShapeDtypeStruct((N, 5), jnp.bfloat16)),
    "experts": {"a": Expert(jax.ShapeDtypeStruct((N, 3, 8, 2), jnp.float32))},
}


def test_tree_bytes_counts_every_leaf():
    assert agg.tree_bytes(TREE) == N * (8 * 4 * 4 + 4 * 6 * 8 + 5 * 2 + 3 * 8 * 2 * 4)


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        ("all", 32 * 4 + 24 * 8 + 5 * 2 + 48 * 4),  # everything, one client's row
        ("none", 0),
        ("experts", 32 * 4 + 24 * 8 + 48 * 4),  # routers local
        ("fedsa", 32 * 4 + 48 * 4),  # only the A's
        ("expert_0", 32 * 4 + 24 * 8 + 16 * 4),  # shared LoRA and expert slot 0 of 3
    ],
)
def test_global_exchange_counts_the_global_part(policy, want):
    assert agg.global_exchange(TREE, policy) == agg.Exchange(want, want)


def test_rank_exchange_truncates_a_and_b():
    one_client = {"attn": {"a": np.zeros((8, 4), np.float32), "b": np.zeros((4, 6), np.float32)}}
    assert agg.rank_exchange(one_client, 2) == agg.Exchange((8 * 2 + 2 * 6) * 4, (8 + 6) * 2 * 4)
    assert agg.rank_exchange(one_client, 4).upload == agg.tree_bytes(one_client)
    with pytest.raises(ValueError, match="rank 5 exceeds"):
        agg.rank_exchange(one_client, 5)


def test_logits_and_model_exchanges():
    assert agg.logits_exchange((2, 3, 7), N) == agg.Exchange(2 * 3 * 7 * 4, (N - 1) * 168)
    assert agg.logits_exchange((2, 7), 4, np.float16).download == 3 * 2 * 7 * 2
    assert agg.model_exchange(100, N) == agg.Exchange(100, 200)
