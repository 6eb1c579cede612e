"""Rank allocation keeps the parameter budget: never above ratio, within 10% below, aligned ranks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_odllm.ranks import ModuleShape, allocate_ranks, effective_multiple, kept_parameters

LLAMA_7B = [
    ModuleShape(n, i, o)
    for n, i, o in [("q", 4096, 4096), ("k", 4096, 4096), ("v", 4096, 4096), ("o", 4096, 4096),
                    ("gate", 4096, 11008), ("up", 4096, 11008), ("down", 11008, 4096)]
]


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5, 0.7, 0.9])
def test_llama7b_budget_and_alignment(ratio):
    ranks = allocate_ranks(LLAMA_7B, ratio, 128)
    total = sum(s.dense_params for s in LLAMA_7B)
    kept = kept_parameters(LLAMA_7B, ranks)
    assert kept <= ratio * total
    assert kept >= 0.9 * ratio * total
    assert all(r % 128 == 0 for r in ranks.values())
    # hand check: r*(in+out) parameters per module
    assert kept == sum(ranks[s.name] * (s.in_features + s.out_features) for s in LLAMA_7B)


def test_ratio_one_keeps_everything_dense():
    assert all(r is None for r in allocate_ranks(LLAMA_7B, 1.0).values())


def test_small_modules_fall_back_to_smaller_multiples():
    assert effective_multiple(1024.0, 128) == 128
    assert effective_multiple(40.0, 128) == 16
    assert effective_multiple(1.5, 128) == 1


def test_invalid_ratio():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        allocate_ranks(LLAMA_7B, 0.0)


dims = st.integers(min_value=16, max_value=700)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(dims, dims), min_size=1, max_size=8),
    ratio=st.floats(min_value=0.15, max_value=0.95),
    multiple=st.sampled_from([1, 8, 32, 128]),
)
def test_budget_property(shapes, ratio, multiple):
    modules = [ModuleShape(f"m{i}", a, b) for i, (a, b) in enumerate(shapes)]
    ranks = allocate_ranks(modules, ratio, multiple)
    total = sum(s.dense_params for s in modules)
    kept = kept_parameters(modules, ranks)
    assert kept <= ratio * total
    for s in modules:
        r = ranks[s.name]
        if r is not None:
            assert 1 <= r and s.lowrank_params(r) < s.dense_params


@pytest.mark.parametrize("ratio", [0.3, 0.4, 0.5, 0.6, 0.7])
def test_int4_factors_get_ranks_aligned_to_their_group(ratio):
    # A 4 x 256 recommender layer with rank_multiple=8: float factors get ranks like 104 or 48, whose int4 factors
    # would use groups of 8 or 16 columns (8 or 6 bits per weight with scale and zero, no integer kernel); with
    # factor_bits=4 every rank is a multiple of 32, under the same budget. int8 (per row, no groups) is unchanged.
    from types import SimpleNamespace

    from optimum_odllm.pipeline import plan_ranks
    from optimum_odllm.quantization.gptq import effective_group_size

    shapes = [ModuleShape(f"l.{p}", i, o) for p, (i, o) in
              {"q": (256, 256), "o": (256, 256), "gate": (256, 1024), "up": (256, 1024), "down": (1024, 256)}.items()]
    floats = plan_ranks(shapes, SimpleNamespace(ratio=ratio, rank_multiple=8))
    int4 = plan_ranks(shapes, SimpleNamespace(ratio=ratio, rank_multiple=8, factor_bits=4, factor_group_size=128))
    assert all(r % 32 == 0 and effective_group_size(r, 128) >= 32 for r in int4.values())
    budget = ratio * sum(s.dense_params for s in shapes)
    assert 0.85 * budget <= kept_parameters(shapes, int4) <= budget
    int8 = plan_ranks(shapes, SimpleNamespace(ratio=ratio, rank_multiple=8, factor_bits=8, factor_group_size=128))
    assert int8 == floats
    if ratio == 0.5:
        assert min(effective_group_size(r, 128) for r in floats.values()) == 8  # the problem being fixed


def test_min_multiple_floor_and_lcm_alignment():
    assert effective_multiple(40.0, 128, min_multiple=32) == 32  # would be 16
    assert effective_multiple(20.0, 128, min_multiple=32) == 8  # the module cannot hold a 32-step: unchanged
    from types import SimpleNamespace

    from optimum_odllm.pipeline import plan_ranks

    shapes = [ModuleShape("a", 4096, 4096), ModuleShape("b", 4096, 11008)]
    ranks = plan_ranks(shapes, SimpleNamespace(ratio=0.5, rank_multiple=192, factor_bits=4, factor_group_size=128))
    assert all(r % 384 == 0 for r in ranks.values())  # lcm(192, 128): both the GEMM step and the int4 group
