"""Quantized low-rank factors (issue 12): quantizers against hand-written references, the module's storage
round trip, and the integer kernels against the dequantized float reference."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from optimum_odllm.lowrank import LowRankLinear
from optimum_odllm.quantization import (
    QuantizedFactor,
    QuantizedLowRankLinear,
    dequantize,
    dequantize_model,
    quantize_lowrank_factors,
    quantize_weight,
    refuse_lora_on_quantized,
    replace_with_quantized_lowrank,
    up_covariance,
)
from optimum_odllm.quantization.kernels import pack_int4, unpack_int4


def correlated_covariance(n: int, seed: int, tokens: int = 2048) -> torch.Tensor:
    """Input covariance of activations with a strongly non-diagonal structure (as real hidden states have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    x += 0.05 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    return x.T @ x / tokens


def output_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    d = weight.double() - approx.double()
    return torch.trace(d @ cov @ d.T).item()


def random_weight(out: int, inp: int, seed: int) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- quantizers

def test_rtn_int8_hand_example():
    # absmax 127 -> scale exactly 1.0 (bf16-representable); round half to even: 2.5 -> 2, -3.4 -> -3
    w = torch.tensor([[127.0, -3.4, 2.5, 0.49], [0.0, 0.0, 0.0, 0.0]])
    q = quantize_weight(w, None, 8, method="rtn")
    assert q.qweight.dtype == torch.int8
    assert q.qweight[0].tolist() == [127, -3, 2, 0]
    assert q.qweight[1].tolist() == [0, 0, 0, 0] and torch.isfinite(q.scales).all()
    assert q.scales[0].item() == 1.0


def test_rtn_int4_hand_example():
    # group [0, 15, 7.4, 3.6]: scale 1, zero 8 (both exact in bf16); codes = round(w - 8) + 8
    w = torch.tensor([[0.0, 15.0, 7.4, 3.6]])
    q = quantize_weight(w, None, 4, group_size=4, method="rtn")
    assert q.qweight.tolist() == [[0, 15, 7, 4]]
    assert q.scales.tolist() == [[1.0]] and q.zeros.tolist() == [[8.0]]


def test_rtn_int3_hand_example_and_fewer_bits_cost_accuracy():
    # group [0, 7, 3.4, 1.6]: 8 levels centred on 4 -> scale 1, zero 4 (exact in bf16); codes = round(w - 4) + 4
    w = torch.tensor([[0.0, 7.0, 3.4, 1.6]])
    q = quantize_weight(w, None, 3, group_size=4, method="rtn")
    assert q.qweight.tolist() == [[0, 7, 3, 2]] and q.bits == 3
    assert q.scales.tolist() == [[1.0]] and q.zeros.tolist() == [[4.0]]
    assert dequantize(q).tolist() == [[0.0, 7.0, 3.0, 2.0]]
    cov = correlated_covariance(256, 5)
    weight = random_weight(64, 256, seed=9)
    errors = [output_error(weight, dequantize(quantize_weight(weight, cov, b, 128, "gptq")), cov) for b in (8, 4, 3, 2)]
    assert errors == sorted(errors)  # each bit removed costs accuracy


def test_three_bit_codes_have_no_storage_format():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantizedFactor(256, 64, 3, 128)


@pytest.mark.parametrize("bits", [8, 4])
def test_rtn_matches_round_reference_and_half_step_bound(bits):
    w = random_weight(48, 256, seed=3) * torch.linspace(0.01, 3.0, 48)[:, None]
    q = quantize_weight(w, None, bits, group_size=64, method="rtn")
    wd = w.double()
    if bits == 8:
        s = q.scales.double()[:, None].expand_as(wd)
        ideal = w.abs().amax(1).double() / 127
        assert (q.scales.double() >= ideal).all() and (q.scales.double() <= ideal * (1 + 2**-7)).all()
        ref = torch.clamp(torch.round(wd / s), -127, 127)
    else:
        s = q.scales.double().repeat_interleave(64, 1)
        z = q.zeros.double().repeat_interleave(64, 1)
        groups = wd.reshape(48, 4, 64)
        assert (q.zeros.double() - 8 * q.scales.double() <= groups.amin(-1) + 1e-12).all()  # range covered
        assert (q.zeros.double() + 7 * q.scales.double() >= groups.amax(-1) - 1e-12).all()
        ref = torch.clamp(torch.round((wd - z) / s) + 8, 0, 15)
    assert torch.equal(q.qweight.double(), ref)
    err = (dequantize(q, torch.float64) - wd).abs()
    assert (err <= s / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    ratios = []
    for seed in range(4):
        cov = correlated_covariance(256, seed)
        w = random_weight(64, 256, seed=100 + seed)
        e_rtn = output_error(w, dequantize(quantize_weight(w, cov, bits, 128, "rtn")), cov)
        e_gptq = output_error(w, dequantize(quantize_weight(w, cov, bits, 128, "gptq")), cov)
        assert e_gptq <= e_rtn
        ratios.append(e_gptq / e_rtn)
    assert sum(ratios) / len(ratios) < 0.9  # strict improvement on average, not a tie


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_gptq_with_identity_covariance_is_rtn(bits):
    # with H = I no error can be moved to other columns, so GPTQ must reduce to plain rounding
    w = random_weight(32, 256, seed=7)
    eye = torch.eye(256, dtype=torch.float64)
    a, b = quantize_weight(w, eye, bits, 128, "gptq"), quantize_weight(w, None, bits, 128, "rtn")
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_gptq_codes_in_range(bits):
    cov = correlated_covariance(128, 0)
    q = quantize_weight(random_weight(40, 128, 1) * 5, cov, bits, 64, "gptq")
    lo, hi, dtype = (-127, 127, torch.int8) if bits == 8 else (0, 2**bits - 1, torch.uint8)
    assert q.qweight.dtype == dtype and q.qweight.min() >= lo and q.qweight.max() <= hi
    assert torch.isfinite(q.scales).all() and (q.scales > 0).all()


def test_nan_inf_and_bad_arguments_raise():
    w = random_weight(8, 64, 0)
    cov = correlated_covariance(64, 0)
    for bad in (float("nan"), float("inf")):
        wb = w.clone()
        wb[3, 5] = bad
        with pytest.raises(ValueError, match="NaN/Inf"):
            quantize_weight(wb, cov, 8, method="gptq")
        cb = cov.clone()
        cb[1, 2] = bad
        with pytest.raises(ValueError, match="NaN/Inf"):
            quantize_weight(w, cb, 4, 32, "gptq")
    with pytest.raises(ValueError, match="divide"):
        quantize_weight(w, None, 4, group_size=48, method="rtn")
    with pytest.raises(ValueError, match="rtn"):
        quantize_weight(w, None, 8, method="gptq")
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(w, None, 5, method="rtn")


def test_lowrank_factors_use_dequantized_down_for_up():
    cov = correlated_covariance(128, 2)
    up, down = random_weight(96, 64, 4), random_weight(64, 128, 5)
    q_up, q_down = quantize_lowrank_factors(up, down, cov, 4, 64, "gptq")
    h_up = up_covariance(dequantize(q_down, torch.float64), cov)
    expected = quantize_weight(up, h_up, 4, 64, "gptq")
    assert torch.equal(q_up.qweight, expected.qweight) and torch.equal(q_up.zeros, expected.zeros)
    # end to end the pair reproduces up @ down on the calibration distribution better than rounding
    dense = up.double() @ down.double()
    r_up, r_down = quantize_lowrank_factors(up, down, cov, 4, 64, "rtn")
    e_gptq = output_error(dense, dequantize(q_up, torch.float64) @ dequantize(q_down, torch.float64), cov)
    e_rtn = output_error(dense, dequantize(r_up, torch.float64) @ dequantize(r_down, torch.float64), cov)
    assert e_gptq < e_rtn


def test_int4_nibble_packing_hand_example_and_round_trip():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4(codes).tolist() == [[0x21, 0x0F]]
    many = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(many)), many)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([[16, 0]], dtype=torch.uint8))


# ---------------------------------------------------------------- the module

def make_quantized(bits: int, seed: int = 0, method: str = "gptq", bias: bool = True) -> QuantizedLowRankLinear:
    torch.manual_seed(seed)
    lowrank = LowRankLinear(256, 192, 128, bias=bias)
    return QuantizedLowRankLinear.from_lowrank(lowrank, correlated_covariance(256, seed), bits, 128, method)


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_safetensors_round_trip_on_meta_skeleton(bits, tmp_path):
    module = make_quantized(bits)
    path = tmp_path / "q.safetensors"
    save_file(module.state_dict(), str(path))
    with torch.device("meta"):
        skeleton = QuantizedLowRankLinear(256, 192, 128, bits, 128, bias=True)
    loaded_sd = load_file(str(path))
    skeleton.load_state_dict(loaded_sd, strict=True, assign=True)
    for key, value in module.state_dict().items():
        assert skeleton.state_dict()[key].dtype == value.dtype
        assert torch.equal(skeleton.state_dict()[key], value), key
    x = torch.randn(2, 3, 256)
    assert torch.equal(skeleton(x), module(x))


@pytest.mark.parametrize("bits", [8, 4])
def test_meta_skeleton_to_empty_then_load(bits):
    module = make_quantized(bits, seed=1)
    with torch.device("meta"):
        skeleton = QuantizedLowRankLinear(256, 192, 128, bits, 128, bias=True)
    skeleton = skeleton.to_empty(device="cpu")
    skeleton.load_state_dict(module.state_dict(), strict=True)
    x = torch.randn(4, 256)
    assert torch.equal(skeleton(x), module(x))


def kernel_tolerance(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Elementwise bound for bf16 activations/outputs: a few bf16 ulps of |x| @ |W|^T."""
    return 2**-8 * (x.abs().double() @ weight.abs().double().T)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factor_kernel_matches_dequantized_reference(bits, dtype):
    w = random_weight(192, 256, 9)
    q = quantize_weight(w, correlated_covariance(256, 9), bits, 128, "gptq")
    factor = QuantizedFactor.from_quantized(q, bias=torch.randn(192))
    expected_kernel = "aten_int8" if bits == 8 else "aten_int4_cpu"
    assert factor.prepared(torch.device("cpu"), dtype).kernel == expected_kernel  # a real integer kernel ran
    x = torch.randn(5, 256).to(dtype)
    y = factor(x)
    assert y.dtype == dtype
    wd = dequantize(q, torch.float64)
    ref = x.double() @ wd.T + factor.bias.double()
    assert ((y.double() - ref).abs() <= kernel_tolerance(x, wd) + 2**-7).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_lowrank_forward_matches_dequantized_lowrank(bits):
    module = make_quantized(bits, seed=2)
    reference = module.dequantize(torch.float64)
    x = torch.randn(3, 7, 256)
    y = module(x).double()
    ref = reference(x.double())
    up, down = reference.up.weight, reference.down.weight
    bound = 2**-7 * ((x.abs().double() @ down.abs().T) @ up.abs().T) + 2**-7
    assert ((y - ref).abs() <= bound).all()


def test_dequantize_returns_exact_lowrank_and_lora_refusal():
    module = make_quantized(4, seed=3)
    float_module = module.dequantize()
    assert isinstance(float_module, LowRankLinear)
    assert torch.equal(float_module.down.weight, module.down.dequantized_weight())
    assert torch.equal(float_module.up.weight, module.up.dequantized_weight())
    model = torch.nn.Sequential(module)
    with pytest.raises(ValueError, match="dequantize_model"):
        refuse_lora_on_quantized(model)
    dequantize_model(model)
    assert isinstance(model[0], LowRankLinear)
    refuse_lora_on_quantized(model)  # no longer raises


def test_asking_another_layout_keeps_the_one_in_use(monkeypatch):
    # int8 on CUDA keeps float32 activations, so one factor serves bf16 and float32 layouts on one device, and
    # `.kernel` asks for float32. A CUDA graph captured through the bf16 layout keeps reading its tensors: asking
    # for the other layout must not free them. On CPU float32 is cast to bf16, so the CUDA rule is patched in.
    from optimum_odllm.quantization import kernels

    monkeypatch.setattr(kernels, "compute_dtype_for", lambda x_dtype, device, bits: x_dtype)
    factor = make_quantized(8, seed=6).down
    in_use = factor.prepared(torch.device("cpu"), torch.bfloat16)
    other = factor.prepared(torch.device("cpu"), torch.float32)
    assert other.compute_dtype == torch.float32 and other is not in_use
    assert factor.prepared(torch.device("cpu"), torch.bfloat16) is in_use


def test_reloaded_weights_invalidate_prepared_kernel_layout():
    a, b = make_quantized(8, seed=4), make_quantized(8, seed=5)
    x = torch.randn(2, 256)
    before = a(x)  # builds and caches the kernel layout
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), before)


@pytest.mark.parametrize("bits", [8, 4])
def test_eager_fast_path_sees_in_place_writes_reassigned_buffers_and_dtype_switches(bits):
    # The eager path remembers the last layout per (device, dtype); every way the stored codes can change after
    # a call must still reach the kernel: an in-place write, a reassigned buffer, and the other activation dtype.
    a, b = make_quantized(bits, seed=4), make_quantized(bits, seed=5)
    x = torch.randn(3, 256)
    expected_b = b(x)
    a(x)  # caches a layout
    cached = [a.down.prepared(x.device, x.dtype), a.up.prepared(x.device, x.dtype)]
    with torch.no_grad():
        for name, tensor in b.state_dict().items():  # codes, scales, zeros and the bias, written in place
            a.get_parameter(name).copy_(tensor) if name.endswith("bias") else a.get_buffer(name).copy_(tensor)
    assert torch.equal(a(x), expected_b)
    assert a.down._last_layout[2] is not cached[0] and a.up._last_layout[2] is not cached[1]  # rebuilt, not reused

    c = make_quantized(bits, seed=6)
    a.up.bias = c.up.bias
    a(x)
    for part in ("down", "up"):  # new tensor objects under the same buffer names
        for name, tensor in getattr(c, part).named_buffers():
            setattr(getattr(a, part), name, tensor.clone())
    assert torch.equal(a(x), c(x))

    bf16 = x.to(torch.bfloat16)
    assert a(bf16).dtype == torch.bfloat16 and a(x).dtype == torch.float32
    assert torch.equal(a(bf16), c(bf16)) and torch.equal(a(x), c(x))


def test_unsupported_int4_shape_falls_back_to_dequantized():
    w = random_weight(40, 128, 11)  # 40 rows: the CPU int4 kernel needs a multiple of 16
    factor = QuantizedFactor.from_quantized(quantize_weight(w, None, 4, 64, "rtn"))
    assert factor.kernel == "dequantized"
    x = torch.randn(3, 128)
    ref = x.double() @ factor.dequantized_weight(torch.float64).T
    assert ((factor(x).double() - ref).abs() <= kernel_tolerance(x, factor.dequantized_weight()) + 2**-7).all()


def test_replace_with_quantized_lowrank_builds_loadable_skeleton():
    source = torch.nn.Sequential(make_quantized(8, seed=6))
    with torch.device("meta"):
        skeleton = torch.nn.Sequential(LowRankLinear(256, 192, 128, bias=True))
    replace_with_quantized_lowrank(skeleton, bits=8, group_size=128)
    skeleton.load_state_dict(source.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 256)
    assert torch.equal(skeleton(x), source(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_kernels_match_dequantized_reference(bits):
    module = make_quantized(bits, seed=8).cuda()
    assert module.down.prepared(torch.device("cuda"), torch.bfloat16).kernel != "dequantized"
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    reference = module.dequantize(torch.float64).cuda()
    ref = reference(x.double())
    up, down = reference.up.weight, reference.down.weight
    bound = 2**-7 * ((x.abs().double() @ down.abs().T) @ up.abs().T) + 2**-7
    assert ((module(x).double() - ref).abs() <= bound).all()


def test_int4_group_halves_for_ranks_not_divisible_by_group():
    # OD-LLM ranks can be 192 (128 + a 64 step): the up factor then uses g64, derivable from shapes alone
    torch.manual_seed(12)
    lowrank = LowRankLinear(256, 128, 192, bias=False)
    module = QuantizedLowRankLinear.from_lowrank(lowrank, correlated_covariance(256, 12), 4, 128, "gptq")
    assert module.down.group_size == 128 and module.up.group_size == 64
    with torch.device("meta"):
        skeleton = QuantizedLowRankLinear(256, 128, 192, 4, 128, bias=False)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}
    skeleton.load_state_dict(module.state_dict(), assign=True)
    x = torch.randn(2, 256)
    assert torch.equal(skeleton(x), module(x))


@pytest.mark.parametrize("in_features", [24, 40])
def test_int8_cpu_kernel_is_not_used_where_it_crashes(in_features):
    # aten._weight_int8pack_mm segfaults on CPU for in_features % 16 != 0 with 2+ tokens (torch 2.13)
    w = random_weight(64, in_features, 13)
    factor = QuantizedFactor.from_quantized(quantize_weight(w, None, 8, method="rtn"))
    assert factor.kernel == "dequantized"
    x = torch.randn(4, in_features)
    ref = x.double() @ factor.dequantized_weight(torch.float64).T
    assert ((factor(x).double() - ref).abs() <= kernel_tolerance(x, factor.dequantized_weight()) + 2**-7).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_factors_compile_in_one_graph(bits):
    # The quantizer says `is_compileable`, so generate's static-cache path compiles these modules: a graph break
    # per factor (the layout cache's data-pointer check) would split a decode step into hundreds of graphs.
    torch._dynamo.reset()
    module = make_quantized(bits, seed=7)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    eager = module(x)  # the eager call (generate's prefill) prepares the layout the graph reads
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), eager)
    torch._dynamo.reset()


# ---------------------------------------------------------------- Triton kernel for integer factors (CUDA)

# (tokens, out, in, bits, group): Llama-7B factor shapes at ratio 0.5 (down 4096 -> 1152, up 1408 -> 11008,
# down of down_proj 11008 -> 1408) and odd sizes that exercise the masks and the halved int4 groups.
INT_SHAPES = [(1, 1152, 4096, 8, None), (1, 11008, 1408, 8, None), (16, 1408, 11008, 8, None), (3, 200, 1000, 8, None),
              (1, 1152, 4096, 4, 128), (1, 11008, 1408, 4, 128), (7, 1408, 11008, 4, 128), (2, 192, 320, 4, 64),
              (1, 96, 192, 4, 32), (33, 1152, 4096, 8, None), (64, 1408, 4096, 4, 128)]


def stored_factor(out: int, inp: int, bits: int, group: int | None, seed: int) -> QuantizedFactor:
    return QuantizedFactor.from_quantized(quantize_weight(random_weight(out, inp, seed) / inp**0.5, None, bits, group, "rtn"))


def test_cuda_kernel_choice_per_factor():
    # Decided from shapes alone (no GPU needed): int8 never uses aten's CUDA int8 kernel (measured 0.07x of bf16)
    # and takes the Triton kernel at few tokens; int4 keeps tinygemm where it applies, Triton only where it cannot.
    from optimum_odllm.quantization import kernels as qk

    cuda = torch.device("cuda")
    assert qk._kernel_for(8, 1152, 4096, None, cuda) == "int8_dequantize_per_call"
    assert qk._kernel_for(8, 1152, 4096, None, torch.device("cpu")) == "aten_int8"
    assert qk.triton_preferred_on_cuda(8, 1152, 4096, None)
    assert qk._kernel_for(4, 1152, 4096, 128, cuda) == "aten_int4_cuda"
    assert not qk.triton_preferred_on_cuda(4, 1152, 4096, 128)
    assert qk._kernel_for(4, 96, 192, 64, cuda) == "dequantized"  # in_features not a multiple of 128: no tinygemm
    assert qk.triton_preferred_on_cuda(4, 96, 192, 64)


def test_int8_dequantize_per_call_matches_reference():
    from optimum_odllm.quantization import kernels as qk

    factor = stored_factor(40, 96, 8, None, seed=16)
    prepared = qk.PreparedWeight("int8_dequantize_per_call", torch.bfloat16, factor.qweight,
                                 factor.scales.to(torch.bfloat16))
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    weight = factor.dequantized_weight(torch.float64)
    out = qk.matmul(x, prepared)
    assert ((out.double() - x.double() @ weight.T).abs() <= kernel_tolerance(x, weight) + 2**-7).all()


def test_int_weight_op_plain_path_matches_dequantized_reference():
    # off CUDA the op is the dequantized product: the reference the Triton kernel is held to on the GPU
    for bits, group in ((8, None), (4, 64)):
        factor = stored_factor(48, 128, bits, group, seed=13)
        x = torch.randn(3, 128, dtype=torch.bfloat16)
        args = (x, factor.qweight, factor.scales, factor.zeros, bits, group or 0)
        ref = x.double() @ factor.dequantized_weight(torch.float64).T
        out = torch.ops.odllm.int_weight_mm(*args)
        assert out.dtype == torch.bfloat16
        assert ((out.double() - ref).abs() <= kernel_tolerance(x, factor.dequantized_weight()) + 2**-7).all()
        torch.library.opcheck(torch.ops.odllm.int_weight_mm.default, args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m,out,inp,bits,group", INT_SHAPES)
def test_every_int_kernel_config_matches_dequantized_reference(m, out, inp, bits, group):
    from optimum_odllm.kernels import triton_intweight

    factor = stored_factor(out, inp, bits, group, seed=14).cuda()
    x = torch.randn(m, inp, device="cuda", dtype=torch.bfloat16)
    weight = factor.dequantized_weight(torch.float64)
    ref = x.double() @ weight.T
    bound = kernel_tolerance(x, weight) + 2**-7
    configs = triton_intweight.candidates(m, out, inp, 132, bits, factor.group_size)
    assert configs
    for config in configs:
        y = triton_intweight.int_weight_with(x, factor.qweight, factor.scales, factor.zeros, bits, factor.group_size,
                                             config)
        assert ((y.double() - ref).abs() <= bound).all(), config
    calls = []
    original = triton_intweight.int_weight
    triton_intweight.int_weight = lambda *a: calls.append(a) or original(*a)
    try:
        with torch.no_grad():  # the module's dispatch: Triton for int8, and for int4 where tinygemm cannot
            y = factor(x)
    finally:
        triton_intweight.int_weight = original
    assert ((y.double() - ref).abs() <= bound).all()
    from optimum_odllm import kernels as gpu_kernels

    assert bool(calls) == (factor.triton_ready and m <= min(gpu_kernels.MAX_INT_KERNEL_TOKENS, gpu_kernels.MAX_INT_KERNEL_ROWS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
def test_int_factors_below_and_above_the_token_limit_match_reference_eager_and_compiled(bits):
    from optimum_odllm import kernels as gpu_kernels

    torch.manual_seed(15)  # in 192 is not a multiple of 128: tinygemm cannot take int4 here, Triton does
    module = QuantizedLowRankLinear.from_lowrank(LowRankLinear(192, 256, 128, bias=True), None, bits, 64, "rtn").cuda()
    assert module.down.triton_ready  # (int4's up, 128 -> 256, fits tinygemm)
    reference = module.dequantize(torch.float64).cuda()
    for tokens in (1, gpu_kernels.MAX_INT_KERNEL_TOKENS + 1):  # Triton, then the prepared kernel
        x = torch.randn(tokens, 192, device="cuda", dtype=torch.bfloat16)
        bound = 2**-7 * ((x.abs().double() @ reference.down.weight.abs().T) @ reference.up.weight.abs().T) + 2**-7
        with torch.no_grad():
            eager = module(x)
            assert ((eager.double() - reference(x.double())).abs() <= bound).all(), tokens
            torch._dynamo.reset()
            compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
            for _ in range(3):  # warm-up runs, then the CUDA-graph replay
                out = compiled(x)
            assert ((out.double() - reference(x.double())).abs() <= bound).all(), tokens
    torch._dynamo.reset()


def test_int_kernel_token_limit_is_capped_at_one_tile(monkeypatch):
    # ODLLM_INT_KERNEL_MAX_TOKENS may be set high; rows beyond one tile must never reach the Triton kernel
    from optimum_odllm import kernels as gpu_kernels

    monkeypatch.setattr(gpu_kernels, "HAS_TRITON", True)
    monkeypatch.setattr(gpu_kernels, "MAX_INT_KERNEL_TOKENS", 4096)
    x = torch.empty(1, 8, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        assert gpu_kernels.use_int_kernel(x, gpu_kernels.MAX_INT_KERNEL_ROWS)
        assert not gpu_kernels.use_int_kernel(x, gpu_kernels.MAX_INT_KERNEL_ROWS + 1)


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_factor_sees_reloaded_weights(bits):
    # Inside torch.compile the cached kernel layout is read without the data-pointer check: loading new weights
    # (or moving/casting the module) must drop it, or a compiled model keeps multiplying by the old weights.
    torch._dynamo.reset()
    a, b = make_quantized(bits, seed=17), make_quantized(bits, seed=18)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        a(x)  # eager call: caches the layout
        compiled = torch.compile(a, backend="aot_eager")
        before = compiled(x)
        a.load_state_dict(b.state_dict())
        after = compiled(x)  # no cached layout now: the graph dequantizes the new codes (not bit-equal to b's kernel)
        a(x)  # an eager call caches the new layout; the graph reads it again
        again = compiled(x)
    reference = b.dequantize(torch.float64)
    bound = 2**-7 * ((x.abs().double() @ reference.down.weight.abs().T) @ reference.up.weight.abs().T) + 2**-7
    assert not torch.equal(after, before)
    assert ((after.double() - reference(x.double())).abs() <= bound).all()
    assert torch.equal(again, b(x))
    torch._dynamo.reset()


@pytest.mark.parametrize("bits", [8, 4])
def test_inductor_compiles_float32_model_before_any_eager_call(bits):
    # Found by recsys_speed.py (odllm-int8+compile): a float32 model (its bf16 scales cast to float32) compiled with
    # inductor before any eager call built the kernel layout inside the graph, and inductor's lowering of aten's
    # CPU integer kernels failed on the cast scales ("LoweringException: AssertionError: Pointwise").
    from optimum_odllm.quantization import prepare_kernel_layouts

    x = torch.randn(3, 256)
    for warm in (False, True):  # without a cached layout (dequantized in the graph), then with prepared layouts
        torch._dynamo.reset()
        module = make_quantized(bits, seed=21).float()
        reference = module.dequantize(torch.float64)
        bound = 2**-7 * ((x.abs().double() @ reference.down.weight.abs().T) @ reference.up.weight.abs().T) + 2**-7
        if warm:
            assert prepare_kernel_layouts(module) == 2
            assert module.down._prepared and module.up._prepared
        with torch.no_grad():
            compiled = torch.compile(module, backend="inductor", fullgraph=True)
            out = compiled(x)
            assert ((out.double() - reference(x.double())).abs() <= bound).all(), warm
            assert torch.equal(compiled(x), out)
    torch._dynamo.reset()


def test_int8_cpu_kernel_gets_aligned_codes_and_activations():
    # Found on 2026-12-03: a recommender loaded with from_pretrained segfaulted in its first beam search. safetensors
    # hands out memory-mapped tensors at any byte offset, and aten._weight_int8pack_mm (torch 2.13, CPU) crashes
    # on codes or activations that are not 64-byte aligned once there are many rows (measured: codes 8 bytes off at
    # 720 tokens, activations 2 or 8 bytes off at 2+ tokens). Run in a subprocess: the failure is a crash.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from optimum_odllm.quantization import QuantizedFactor, quantize_weight
        torch.manual_seed(0)
        factor = QuantizedFactor.from_quantized(quantize_weight(torch.randn(72, 256), None, 8, method="rtn"))
        codes = torch.empty(72 * 256 + 64, dtype=torch.int8)
        misaligned = codes[8:8 + 72 * 256].view(72, 256)  # as a memory-mapped checkpoint can hand it out
        misaligned.copy_(factor.qweight)
        factor.qweight = misaligned
        assert factor.kernel == "aten_int8" and factor.qweight.data_ptr() % 64
        x = torch.randn(720 * 256 + 64, dtype=torch.bfloat16)[4:4 + 720 * 256].view(720, 256)
        reference = x.double() @ factor.dequantized_weight(torch.float64).T
        bound = 2**-6 * (x.abs().double() @ factor.dequantized_weight(torch.float64).abs().T) + 2**-6
        assert ((factor(x).double() - reference).abs() <= bound).all()
        with torch.no_grad():  # in a graph too: the view's pointer is unknown when the graph is traced
            compiled = torch.compile(factor, backend="aot_eager", fullgraph=True)
            assert ((compiled(x).double() - reference).abs() <= bound).all()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_module_built_under_inference_mode_runs():
    # Inference tensors keep no version counter: reading it for the layout's staleness check used to raise
    # "Inference tensors do not track version counter" for a module built (or loaded) under inference_mode.
    with torch.inference_mode():
        module = make_quantized(8, seed=23)
        x = torch.randn(2, 256)
        assert torch.equal(module(x), module(x))
