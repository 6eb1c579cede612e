"""Quantized factors wired end to end (issue 12): config/CLI, the layer loop, resume, the loader, dequantize(),
the model card and the recovery refusal, each against an independent reference."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import calibration_ids, tiny_model
from test_data_safety import _interrupt_after_first_layer, assert_never_random, load_in_fresh_process, logits
from optimum_odllm import ODLLMCompressor, ODLLMConfig
from optimum_odllm.cli_options import build_parser
from optimum_odllm.linalg import NonFiniteError
from optimum_odllm.lowrank import LowRankLinear
from optimum_odllm.quantization import QuantizedLowRankLinear, dequantize_model

BITS = [8, 4]


def make_config(**overrides) -> ODLLMConfig:
    settings = dict(ratio=0.5, rank_multiple=8, calibration_batch_size=4, min_calibration_tokens=16)
    settings.update(overrides)
    return ODLLMConfig(**settings)


def compressed(**config) -> ODLLMCompressor:
    compressor = ODLLMCompressor(tiny_model(), make_config(**config))
    compressor.compress(calibration_ids())
    return compressor


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLowRankLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLowRankLinear)}


@pytest.fixture(scope="module", params=BITS)
def saved(request, tmp_path_factory):
    """One int8 and one int4 compression, saved once for the loader tests."""
    compressor = compressed(factor_bits=request.param)
    path = tmp_path_factory.mktemp(f"int{request.param}") / "out"
    compressor.save_pretrained(path)
    return request.param, compressor, path


# ------------------------------------------------------------------ settings
def test_cli_flags_parse_to_config_values():
    args = build_parser().parse_args(["compress", "m", "-o", "o", "--factor-bits", "4", "--factor-group-size", "64",
                                      "--factor-quantizer", "rtn"])
    assert (args.factor_bits, args.factor_group_size, args.factor_quantizer) == (4, 64, "rtn")
    assert build_parser().parse_args(["compress", "m", "-o", "o"]).factor_bits is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "m", "-o", "o", "--factor-bits", "3"])


@pytest.mark.parametrize("bad", [dict(factor_bits=3), dict(factor_bits=8.0), dict(factor_bits=True),
                                 dict(factor_group_size=63), dict(factor_quantizer="awq")])
def test_invalid_factor_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_config(**bad)


# ------------------------------------------------------------------ the layer loop
@pytest.mark.parametrize("bits", BITS)
def test_compression_installs_quantized_factors_and_reports_bits(bits):
    compressor = compressed(factor_bits=bits)
    modules = quantized_modules(compressor.model)
    assert set(modules) == set(compressor.config.ranks) and len(modules) == 14
    assert not any(isinstance(m, LowRankLinear) for m in compressor.model.modules())
    for entry in compressor.report.modules:
        assert entry.factor_bits == bits and 0 < entry.quantization_loss < (0.01 if bits == 8 else 0.2)
        assert modules[entry.name].rank == entry.rank
    assert "quantize" in compressor.report.stage_seconds


def test_gptq_loses_less_output_energy_than_rounding():
    gptq = sum(m.quantization_loss for m in compressed(factor_bits=4).report.modules)
    rtn = sum(m.quantization_loss for m in compressed(factor_bits=4, factor_quantizer="rtn").report.modules)
    assert gptq < rtn


def test_quantization_loss_matches_an_independent_dense_computation():
    """The report's number, recomputed from the dense weights of the float and the quantized model."""
    compressor = compressed(factor_bits=4, progressive=False)  # every module sees the dense model's inputs
    name = "model.layers.1.mlp.down_proj"
    entry = next(m for m in compressor.report.modules if m.name == name)
    quantized = compressor.model.get_submodule(name)
    captured = []
    dense = tiny_model()
    dense.get_submodule(name).register_forward_pre_hook(lambda mod, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in calibration_ids().split(4):
            dense(batch)
    x = torch.cat(captured).double()
    reference = ODLLMCompressor(tiny_model(), make_config(progressive=False)).compress(calibration_ids())
    w_float = reference.get_submodule(name).weight.double()
    w_quant = quantized.dequantize(torch.float64).weight
    expected = ((x @ (w_float - w_quant).T) ** 2).sum() / ((x @ w_float.T) ** 2).sum()
    # the float model's factors are rounded to its dtype (float32); the report uses the float64 solution
    assert entry.quantization_loss == pytest.approx(expected.item(), rel=1e-3)


def test_progressive_propagation_runs_through_the_quantized_layer(monkeypatch):
    from optimum_odllm import pipeline

    seen = []
    original = pipeline.run_layer

    def run_layer(layer, *args, **kwargs):
        seen.append(sum(isinstance(m, QuantizedLowRankLinear) for m in layer.modules()))
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run_layer", run_layer)
    compressed(factor_bits=8)
    assert seen and all(count == 7 for count in seen)


def test_data_free_compression_needs_rtn():
    with pytest.raises(ValueError, match="factor_quantizer='rtn'"):
        ODLLMCompressor(tiny_model(), make_config(factor_bits=8, whitening=False, progressive=False)).compress(None)
    model = ODLLMCompressor(tiny_model(), make_config(factor_bits=8, factor_quantizer="rtn", whitening=False,
                                                      progressive=False)).compress(None)
    assert len(quantized_modules(model)) == 14


@pytest.mark.parametrize("bits", BITS)
def test_resume_of_a_quantized_run_is_bit_identical(bits, tmp_path, monkeypatch):
    ids, ckpt = calibration_ids(), tmp_path / "ckpt"
    _interrupt_after_first_layer(monkeypatch, ODLLMCompressor(tiny_model(), make_config(factor_bits=bits)), ckpt, ids)
    resumed = ODLLMCompressor(tiny_model(), make_config(factor_bits=bits))
    resumed.compress(ids, checkpoint_dir=ckpt, resume=True)
    straight = compressed(factor_bits=bits)
    a, b = resumed.model.state_dict(), straight.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m.quantization_loss for m in resumed.report.modules] == [m.quantization_loss for m in straight.report.modules]


def test_resume_refuses_other_factor_bits(tmp_path, monkeypatch):
    from optimum_odllm.checkpointing import CheckpointError

    ids, ckpt = calibration_ids(), tmp_path / "ckpt"
    _interrupt_after_first_layer(monkeypatch, ODLLMCompressor(tiny_model(), make_config(factor_bits=8)), ckpt, ids)
    with pytest.raises(CheckpointError, match="factor_bits"):
        ODLLMCompressor(tiny_model(), make_config(factor_bits=4)).compress(ids, checkpoint_dir=ckpt, resume=True)


# ------------------------------------------------------------------ the loader
def test_save_then_from_pretrained_gives_bit_identical_logits(saved):
    bits, compressor, path = saved
    assert json.loads((path / "config.json").read_text())["quantization_config"]["factor_bits"] == bits
    loaded = AutoModelForCausalLM.from_pretrained(path)
    modules = quantized_modules(loaded)
    assert set(modules) == set(compressor.config.ranks)
    assert all(m.bits == bits for m in modules.values())
    assert torch.equal(logits(loaded), logits(compressor.model))


def test_loading_without_the_package_is_refused(saved, tmp_path):
    _, compressor, path = saved
    result = load_in_fresh_process(path, tmp_path)
    assert result.returncode != 0  # quantized factors can never pass as dense weights
    assert_never_random(result, logits(compressor.model), tmp_path)


def _damaged_copy(path, tmp_path, edit):
    import shutil

    target = tmp_path / "damaged"
    shutil.copytree(path, target)
    weights = target / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return target


MODULE = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop(f"{MODULE}.up.scales"), "missing"),
    (lambda t: t.update({f"{MODULE}.down.qweight": t[f"{MODULE}.down.qweight"][:-1]}), "shape"),
    (lambda t: t.update({f"{MODULE}.down.qweight": t[f"{MODULE}.down.qweight"].to(torch.int16)}), "dtype"),
    (lambda t: t.update({f"{MODULE}.down.weight": torch.zeros(3, 3)}), "unexpected"),
])
def test_damaged_quantized_checkpoints_fail_naming_the_module(saved, tmp_path, damage, message):
    _, _, path = saved
    with pytest.raises(ValueError, match=f"{MODULE}.*{message}"):
        AutoModelForCausalLM.from_pretrained(_damaged_copy(path, tmp_path, damage))


def test_nan_scale_fails_naming_the_module(saved, tmp_path):
    _, _, path = saved

    def poison(tensors):
        tensors[f"{MODULE}.up.scales"][0] = float("nan")

    with pytest.raises(NonFiniteError, match=f"{MODULE}.up.scales"):
        AutoModelForCausalLM.from_pretrained(_damaged_copy(path, tmp_path, poison))


def test_dequantize_merges_into_dense_linears(saved):
    bits, compressor, path = saved
    loaded = AutoModelForCausalLM.from_pretrained(path)
    reference = dequantize_model(copy.deepcopy(loaded), torch.float64)  # float64 factors of the same codes
    loaded.dequantize()
    for name in compressor.config.ranks:
        merged = loaded.get_submodule(name)
        assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
        torch.testing.assert_close(merged.weight.double(), reference.get_submodule(name).weight, rtol=0, atol=1e-6)
    assert getattr(loaded.config, "quantization_config", None) is None


# ------------------------------------------------------------------ card, recovery
def test_model_card_states_bits_and_bytes(saved):
    bits, compressor, path = saved
    card = (path / "README.md").read_text()
    assert f"int{bits} (" in card and "bits per weight" in card
    from optimum_odllm.modelcard import _human, build_model_card

    float_text = str(build_model_card(compressed().result))
    row = lambda text: next(line for line in text.splitlines() if line.startswith("| Parameter bytes"))  # noqa: E731
    before_q, after_q = (cell.strip() for cell in row(card).split("|")[2:4])
    before_f, after_f = (cell.strip() for cell in row(float_text).split("|")[2:4])
    assert before_q == before_f  # the same dense model before compression
    # after: exactly the bytes the weights file holds (its guard tensors are empty)
    stored = sum(t.numel() * t.element_size() for t in load_file(path / "model.safetensors").values())
    assert after_q == _human(stored, "B") and after_q != after_f


def test_recovery_fine_tuning_of_quantized_factors_is_refused(saved):
    from optimum_odllm.recovery import apply_lora_to_factors, lowrank_modules, mark_factors_trainable

    _, _, path = saved
    model = AutoModelForCausalLM.from_pretrained(path)
    for start in (lowrank_modules, mark_factors_trainable, apply_lora_to_factors):
        with pytest.raises(ValueError, match="dequantize_model"):
            start(model)
    assert not model.hf_quantizer.is_trainable
    dequantize_model(model)
    assert mark_factors_trainable(model) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_codes_and_scales_load_unchanged_whatever_dtype_the_model_loads_in(saved, dtype):
    _, compressor, path = saved
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).state_dict()
    original = compressor.model.state_dict()
    keys = [k for k in original if k.endswith((".qweight", ".scales", ".zeros"))]
    assert keys
    for key in keys:
        assert loaded[key].dtype == original[key].dtype and torch.equal(loaded[key], original[key]), key


@pytest.mark.parametrize("bits", BITS)
def test_quantize_factors_after_recovery_round_trips(bits, tmp_path):
    # compress (float factors) -> change the factors as recovery fine-tuning would -> round them to integers ->
    # save_pretrained -> from_pretrained gives the same logits; the config says how the factors were made
    from optimum_odllm.quantization import quantize_factors

    model = compressed().model
    before_recovery = logits(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LowRankLinear):
                module.up.weight.mul_(1.5)  # "recovered" factors: not what compression produced
    recovered = logits(model)
    quantize_factors(model, bits, group_size=32)
    modules = quantized_modules(model)
    assert modules and all(m.bits == bits for m in modules.values())
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    close = logits(model)
    # the codes stand for the recovered factors (not the compressor's), and the kernels run those codes
    assert (close - recovered).abs().max() < (close - before_recovery).abs().max()
    reference = logits(dequantize_model(copy.deepcopy(model)))
    torch.testing.assert_close(close, reference, atol=0.02, rtol=0.02)
    model.save_pretrained(tmp_path / "q")
    saved_config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (saved_config["factor_bits"], saved_config["factor_quantizer"]) == (bits, "rtn")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(loaded), close)
    with pytest.raises(ValueError, match="already integer"):
        quantize_factors(model, bits)


def test_quantize_factors_refuses_models_it_cannot_quantize():
    from optimum_odllm.quantization import quantize_factors

    with pytest.raises(ValueError, match="OD-LLM compressed"):
        quantize_factors(tiny_model(), 8)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_factors(compressed().model, 3)


def test_dequantize_model_then_save_load_and_requantize(tmp_path):
    # the documented recovery path on a quantized checkpoint: dequantize_model -> (fine-tune) -> save or
    # quantize_factors. The config must stop saying factor_bits, or the saved float factors cannot be loaded.
    from optimum_odllm.quantization import quantize_factors

    model = compressed(factor_bits=8).model
    dequantize_model(model)
    assert model.config.quantization_config.factor_bits is None
    model.save_pretrained(tmp_path / "float")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert torch.equal(logits(loaded), logits(model))
    quantize_factors(model, 4, group_size=32)
    assert model.config.quantization_config.factor_bits == 4
