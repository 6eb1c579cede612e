"""Triton kernels for the two thin GEMMs of a low-rank projection at small token counts.

At decode and short prefill (a few tokens, ``M`` small) both GEMMs are memory-bound: the time is the
bytes of the factors read. Two kernels here, both one launch:

* ``down``: ``t[M, N] = x[M, K] @ w[N, K]^T`` with the reduction ``K`` split across programs
  (split-K) so that even a narrow ``N`` gives enough programs to fill the GPU; partial sums are
  float32 and reduced by a second tiny kernel in a fixed order (deterministic, no atomics);
* ``grouped_up``: the ``up`` factors of up to three projections that share one input (q/k/v or
  gate/up) in one launch, each program finding its group from its block index and reading its
  slice of the shared ``t``; the output is the concatenation ``[M, sum N_g]``.

Each shape is tuned once per process on the real inputs, timed inside a CUDA graph (launch gaps
excluded, as in the compiled decode loop), with cuBLAS among the candidates: whichever is faster
for that shape runs, so the op is never slower than the plain product it replaces.

This module imports Triton at import time; :mod:`optimum_odllm.kernels` only imports it when Triton
and CUDA are there, so CPU-only installs never see it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .capabilities import MAX_GROUPS


@triton.jit
def _down_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for kk in range(0, k_per_split, BLOCK_K):
        offs_k = k_start + kk + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w))
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT == 1:
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # float32 partials [SPLIT, M, N]
        tl.store(out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, out_ptr, numel, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_up_kernel(
    t_ptr, w_ptr, b_ptr, y_ptr, M, stride_tm, stride_ym,
    n0, n1, n2, r0, r1, r2, r_max, w1_off, w2_off, b1_off, b2_off,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Group g covers output columns [col_g, col_g + n_g) and reads t's columns [k_g, k_g + r_g).
    # Its weight (and bias) lives at an element offset from group 0's pointer (separate allocations).
    pid = tl.program_id(0)
    nb0 = tl.cdiv(n0, BLOCK_N)
    nb1 = tl.cdiv(n1, BLOCK_N)
    is1 = (pid >= nb0) & (pid < nb0 + nb1)
    is2 = pid >= nb0 + nb1
    block = tl.where(is2, pid - nb0 - nb1, tl.where(is1, pid - nb0, pid))
    n_g = tl.where(is2, n2, tl.where(is1, n1, n0))
    r_g = tl.where(is2, r2, tl.where(is1, r1, r0))
    k_g = tl.where(is2, r0 + r1, tl.where(is1, r0, 0))
    col_g = tl.where(is2, n0 + n1, tl.where(is1, n0, 0))
    w_off = tl.where(is2, w2_off, tl.where(is1, w1_off, 0))
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    wg_ptr = w_ptr + w_off
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, r_max, BLOCK_K):  # r_max: a plain bound; r_g masks
        offs_k = k + tl.arange(0, BLOCK_K)
        t = tl.load(t_ptr + offs_m[:, None] * stride_tm + (k_g + offs_k)[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < r_g), other=0.0)
        w = tl.load(wg_ptr + offs_n[:, None] * r_g + offs_k[None, :],
                    mask=(offs_n[:, None] < n_g) & (offs_k[None, :] < r_g), other=0.0)
        acc += tl.dot(t, tl.trans(w))
    if HAS_BIAS:
        b_off = tl.where(is2, b2_off, tl.where(is1, b1_off, 0))
        bias = tl.load(b_ptr + b_off + offs_n, mask=offs_n < n_g, other=0.0)
        acc += bias[None, :].to(tl.float32)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < n_g)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + (col_g + offs_n)[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


CUBLAS = "cublas"  # a candidate of every tuning: the plain cuBLAS product, when it is faster
_CHOICES: dict[tuple, object] = {}
_TIMINGS: dict[tuple, dict[object, float]] = {}


def graph_time_ms(fn, calls: int = 10, replays: int = 5) -> float:
    """GPU milliseconds per call of ``fn``, from replays of a CUDA graph of ``calls`` calls (no launch gaps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # JIT compile and allocator warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (calls * replays)


def _pick(key: tuple, candidates: list, run) -> object:
    """Fastest candidate for ``key``, timed once per process on the real inputs (like ``triton.autotune``).

    While a CUDA graph is being captured nothing can be timed: the first candidate (a heuristic) is used
    and not remembered.
    """
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    timings = {c: graph_time_ms(lambda c=c: run(c)) for c in candidates}
    _TIMINGS[key] = timings
    _CHOICES[key] = choice = min(timings, key=timings.get)
    return choice


def down_candidates(m: int, n: int, k: int, sms: int) -> list:
    """Heuristic first (split K until about two programs per SM), then variations, then cuBLAS."""
    first = down_config(m, n, k, sms)
    others = [(bn, bk, sp) for bn in (32, 64) for bk in (128, 256) for sp in (1, 2, 4, 8)
              if triton.cdiv(k, bk * sp) >= 2 and sms // 2 <= triton.cdiv(n, bn) * sp <= 8 * sms and (bn, bk, sp) != first]
    return [first] + others + [CUBLAS]


def down_config(m: int, n: int, k: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT): split K until there are about two programs per SM."""
    block_n = 32 if m <= 16 else 64
    block_k = 128 if m <= 16 else 64
    blocks = triton.cdiv(n, block_n)
    split = 1
    while blocks * split < 2 * sms and triton.cdiv(k, block_k * split * 2) >= 4:
        split *= 2
    return block_n, block_k, split


def down_with(x: torch.Tensor, w: torch.Tensor, config) -> torch.Tensor:
    """``x @ w^T`` with one given candidate (a Triton config or :data:`CUBLAS`)."""
    if config == CUBLAS:
        return torch.nn.functional.linear(x, w)
    block_n, block_k, split = config
    m, k = x.shape
    n = w.shape[0]
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, block_n), split)
    target = out if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    _down_kernel[grid](x, w, target, m, n, k, x.stride(0), w.stride(0), k_per_split,
                       BLOCK_M=_block_m(m), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split, num_warps=4)
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](target, out, m * n, SPLIT=split, BLOCK=block)
    return out


def down(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x[M, K] @ w[N, K]^T`` for small ``M`` (contiguous, same dtype and device), fastest measured way."""
    m, k = x.shape
    n = w.shape[0]
    key = ("down", triton.next_power_of_2(m), n, k, x.dtype, x.device.index)
    config = _pick(key, down_candidates(m, n, k, _sm_count(x.device)), lambda c: down_with(x, w, c))
    return down_with(x, w, config)


def _element_offset(base: torch.Tensor, other: torch.Tensor) -> int:
    delta = other.data_ptr() - base.data_ptr()
    size = base.element_size()
    if delta % size:
        raise ValueError("grouped_up needs element-aligned weights; call .contiguous() on the up factors")
    return delta // size


def grouped_up_with(t: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], config) -> torch.Tensor:
    """The grouped ``up`` product with one given candidate (``(BLOCK_N, BLOCK_K)`` or :data:`CUBLAS`)."""
    if config == CUBLAS:
        parts = t.split([w.shape[1] for w in weights], dim=-1)
        outs = [torch.nn.functional.linear(p, w, biases[i] if biases else None) for i, (p, w) in enumerate(zip(parts, weights))]
        return torch.cat(outs, dim=-1)
    block_n, block_k = config
    pad = MAX_GROUPS - len(weights)
    m = t.shape[0]
    ns = [w.shape[0] for w in weights] + [0] * pad
    rs = [w.shape[1] for w in weights] + [0] * pad
    w_offs = [_element_offset(weights[0], w) for w in weights[1:]] + [0] * pad
    b_offs = [_element_offset(biases[0], b) for b in biases[1:]] if biases else []
    b_offs += [0] * (MAX_GROUPS - 1 - len(b_offs))
    y = torch.empty((m, sum(ns)), device=t.device, dtype=t.dtype)
    grid = (sum(triton.cdiv(n, block_n) for n in ns),)
    _grouped_up_kernel[grid](
        t, weights[0], biases[0] if biases else weights[0], y, m, t.stride(0), y.stride(0),
        ns[0], ns[1], ns[2], rs[0], rs[1], rs[2], max(rs), w_offs[0], w_offs[1], b_offs[0], b_offs[1],
        HAS_BIAS=bool(biases), BLOCK_M=_block_m(m), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return y


def up_candidates() -> list:
    return [(32, 64), (16, 64), (64, 64), (32, 128), (64, 128), CUBLAS]


def grouped_up(t: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """``[t_0 @ w_0^T + b_0, t_1 @ w_1^T + b_1, ...]`` concatenated, ``t_g`` the g-th column block of ``t``."""
    if not 1 <= len(weights) <= MAX_GROUPS:
        raise ValueError(f"grouped_up takes 1 to {MAX_GROUPS} weights, got {len(weights)}")
    shapes = tuple(tuple(w.shape) for w in weights)
    key = ("up", triton.next_power_of_2(t.shape[0]), shapes, bool(biases), t.dtype, t.device.index)
    config = _pick(key, up_candidates(), lambda c: grouped_up_with(t, weights, biases, c))
    return grouped_up_with(t, weights, biases, config)
