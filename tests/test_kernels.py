"""The low-rank ops against independent references: float64 products on CPU (CI), Triton kernels on CUDA.

CPU tests check the custom-op registration (``torch.library.opcheck``: schema, fake tensors, autograd
refusal) and the plain path. Tests marked ``gpu`` run the Triton kernels; run them on a CUDA machine with
``python -m pytest -q -m gpu tests/test_kernels.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_odllm import kernels
from optimum_odllm.fused import fuse_shared_inputs
from optimum_odllm.lowrank import LowRankLinear

cuda = pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs CUDA and Triton")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out.double() - ref).norm() / ref.norm())


def reference_up(t: torch.Tensor, weights, biases) -> torch.Tensor:
    parts = t.double().split([w.shape[1] for w in weights], dim=-1)
    outs = [p @ w.double().T + (biases[i].double() if biases else 0) for i, (p, w) in enumerate(zip(parts, weights))]
    return torch.cat(outs, dim=-1)


def test_ops_registered_and_plain_path_on_cpu():
    x, w = torch.randn(3, 40, dtype=torch.float64), torch.randn(24, 40, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.odllm.lowrank_down(x, w), x @ w.T)
    ups = [torch.randn(7, 10, dtype=torch.float64), torch.randn(5, 14, dtype=torch.float64)]
    biases = [torch.randn(7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    torch.testing.assert_close(torch.ops.odllm.grouped_up(w[:3, :24], ups, biases), reference_up(w[:3, :24], ups, biases))
    torch.library.opcheck(torch.ops.odllm.lowrank_down.default, (x, w))
    torch.library.opcheck(torch.ops.odllm.grouped_up.default, (w[:3, :24], ups, biases))


def test_kernels_are_never_picked_off_cuda():
    x = torch.randn(1, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not kernels.use_kernels(x, 1)


# Llama-7B shapes at ratio 0.5 (ranks 1024 / 1408 / 1536) and odd sizes that exercise every mask.
DOWN_SHAPES = [(1, 3072, 4096), (1, 1024, 4096), (1, 1408, 11008), (4, 2816, 4096), (16, 1536, 4096), (3, 200, 1000)]
UP_SHAPES = [
    (1, [(4096, 1024)] * 3),
    (1, [(11008, 1408)] * 2),
    (7, [(4096, 1536)]),
    (16, [(896, 128), (128, 64), (128, 64)]),  # GQA: k/v narrower than q, other ranks
    (2, [(300, 40), (77, 24)]),
]


def triton_module():
    from optimum_odllm.kernels import triton_lowrank

    return triton_lowrank


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m,n,k", DOWN_SHAPES)
def test_every_down_config_matches_float64(m, n, k):
    tl = triton_module()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    ref = x.double() @ w.double().T
    cublas = rel_error(x @ w.T, ref)
    for config in tl.down_candidates(m, n, k, 132):
        err = rel_error(tl.down_with(x, w, config), ref)
        assert err < 2 * cublas + 1e-3, (config, err, cublas)  # the rounding class of the bf16 cuBLAS product
    assert rel_error(torch.ops.odllm.lowrank_down(x, w), ref) < 2 * cublas + 1e-3  # the tuned choice


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,shapes", UP_SHAPES)
def test_every_grouped_up_config_matches_float64(m, shapes, bias):
    tl = triton_module()
    weights = [torch.randn(n, r, device="cuda", dtype=torch.bfloat16) / r**0.5 for n, r in shapes]
    biases = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n, _ in shapes] if bias else []
    t = torch.randn(m, sum(r for _, r in shapes), device="cuda", dtype=torch.bfloat16)
    ref = reference_up(t, weights, biases)
    for config in tl.up_candidates():
        out = tl.grouped_up_with(t, weights, biases, config)
        assert out.shape == (m, sum(n for n, _ in shapes))
        assert rel_error(out, ref) < 1e-2, config
    assert rel_error(torch.ops.odllm.grouped_up(t, weights, biases), ref) < 1e-2


def llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=4,
                         num_hidden_layers=layers, vocab_size=1000)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    from optimum_odllm.lowrank import replace_with_lowrank_linear

    ranks = {n: 128 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    replace_with_lowrank_linear(model, ranks)
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.to("cuda", torch.bfloat16)
            for p in module.parameters():
                torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.gpu
@cuda
def test_compiled_fused_model_runs_the_kernels_and_matches_the_plain_model():
    model = llama()
    fused = copy.deepcopy(model)
    fuse_shared_inputs(fused)
    step = torch.randint(0, 1000, (max(1, kernels.MAX_KERNEL_TOKENS), 1), device="cuda")  # tokens the kernels take
    original = torch.ops.odllm.lowrank_down.default

    with torch.no_grad():
        reference = model(step).logits.double()
        compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, record, replay
            out = compiled(step).logits
        assert rel_error(out, reference) < 2e-2
        from torch._dynamo.testing import CompileCounterWithBackend

        counter = CompileCounterWithBackend("eager")
        torch._dynamo.reset()
        torch.compile(fused, backend=counter, fullgraph=True)(step)
        ops = [n.target for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"]
        assert original in ops or torch.ops.odllm.lowrank_down in ops  # the graph holds the custom op
