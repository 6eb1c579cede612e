"""Block refinement (``refine_steps``): what it minimizes, that it never ends worse than the closed form on the
held-out batches, what it may change, and where it is refused."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

from conftest import calibration_ids, tiny_model
from optimum_odllm import ODLLMCompressor, ODLLMConfig
from optimum_odllm.lowrank import LowRankLinear
from optimum_odllm.refinement import RefinementBatch, refine_block, split_held_out


class OneModuleBlock(nn.Module):
    """A 'decoder layer' that is a single low-rank Linear: its best rank-r fit is known in closed form."""

    def __init__(self, module: LowRankLinear):
        super().__init__()
        self.proj = module

    def forward(self, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.proj(hidden)


def _linear_problem(seed: int = 0, batches: int = 8, tokens: int = 64, d_in: int = 16, d_out: int = 12):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)  # correlated inputs: whitening matters
    weight = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    out = []
    for _ in range(batches):
        x = (torch.randn(1, tokens, d_in, generator=g, dtype=torch.float64) @ mixing).float()
        out.append(RefinementBatch(x, {}, torch.ones(1, tokens, dtype=torch.bool), (x.double() @ weight.T).float()))
    return weight, out


def _stacked(batches: list[RefinementBatch]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([b.inputs.double().reshape(-1, b.inputs.shape[-1]).numpy() for b in batches])
    y = np.concatenate([b.target.double().reshape(-1, b.target.shape[-1]).numpy() for b in batches])
    return x, y


def _eckart_young_fit(weight: torch.Tensor, batches: list[RefinementBatch], rank: int) -> np.ndarray:
    """argmin over rank-r M of ||X M^T - X W^T||: the truncated SVD of W L (X^T X = L L^T), times L^-1 (numpy)."""
    x, _ = _stacked(batches)
    chol = np.linalg.cholesky(x.T @ x)
    u, s, vt = np.linalg.svd(weight.numpy() @ chol)
    return (u[:, :rank] * s[:rank]) @ vt[:rank] @ np.linalg.inv(chol)


def _relative_error(m: np.ndarray, batches: list[RefinementBatch]) -> float:
    x, y = _stacked(batches)
    return float(((x @ m.T - y) ** 2).sum() / (y**2).sum())


def test_split_held_out_keeps_every_eighth_batch_and_guards_a_single_batch():
    batches = list(range(20))
    train, held = split_held_out(batches)
    assert held == [7, 15] and train == [b for b in batches if b not in (7, 15)]
    assert split_held_out([0, 1, 2]) == ([0, 1], [2])
    assert split_held_out(["only"]) == (["only"], ["only"])


def test_refinement_minimizes_the_block_output_error_down_to_the_eckart_young_optimum():
    weight, batches = _linear_problem()
    torch.manual_seed(0)
    block = OneModuleBlock(LowRankLinear(16, 12, rank=4, bias=False))  # random factors: far from the optimum
    train, held = split_held_out(batches)
    outcome = refine_block(block, [block.proj.down.weight, block.proj.up.weight], batches, 3000, 1e-2, torch.device("cpu"))
    optimum = _eckart_young_fit(weight, train, 4)  # the best rank-4 fit to the batches it is trained on
    reference = _relative_error(optimum, held)  # ... scored on the held-out batches, as refine_block scores
    assert outcome.held_out_before > 3 * reference
    assert reference * 0.98 <= outcome.held_out_after <= reference * 1.02
    refined = (block.proj.up.weight @ block.proj.down.weight).double().detach().numpy()
    assert _relative_error(refined, train) >= _relative_error(optimum, train) * 0.9999  # nothing beats Eckart-Young
    assert outcome.steps > 0


def test_a_diverging_refinement_restores_the_closed_form_factors_bit_exactly():
    _, batches = _linear_problem(seed=1)
    block = OneModuleBlock(LowRankLinear(16, 12, rank=4, bias=True))
    block.requires_grad_(False)  # as in the pipeline (no_grad model): the flags must come back as they were
    before = copy.deepcopy(block.state_dict())
    outcome = refine_block(block, [block.proj.down.weight, block.proj.up.weight], batches, 40, 1e3, torch.device("cpu"))
    assert outcome.steps == 0 and outcome.held_out_after == outcome.held_out_before
    for key, value in block.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(p.requires_grad for p in block.parameters()) and all(p.grad is None for p in block.parameters())


def test_refinement_shows_a_progress_bar_unless_transformers_progress_bars_are_off(capsys):
    from transformers.utils import logging as hf_logging

    if os.environ.get("TQDM_DISABLE"):
        pytest.skip("TQDM_DISABLE is set: tqdm draws no bar at all")
    _, batches = _linear_problem()
    block = OneModuleBlock(LowRankLinear(16, 12, rank=4, bias=False))
    factors = [block.proj.down.weight, block.proj.up.weight]
    enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        refine_block(block, factors, batches, 16, 1e-3, torch.device("cpu"), "layer 3")
        shown = capsys.readouterr().err
        hf_logging.disable_progress_bar()
        refine_block(block, factors, batches, 16, 1e-3, torch.device("cpu"), "layer 3")
        hidden = capsys.readouterr().err
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    assert "refining layer 3" in shown and "/16" in shown and "held_out=" in shown
    assert "refining" not in hidden


def _layer0_error(model, dense, ids: torch.Tensor) -> float:
    """Relative error of decoder layer 0's output against the dense model's, computed here from full forwards."""
    outputs = []
    for m in (model, dense):
        captured = []
        handle = m.model.layers[0].register_forward_hook(lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            m(input_ids=ids)
        handle.remove()
        outputs.append(captured[0].double())
    return float((outputs[0] - outputs[1]).square().sum() / outputs[1].square().sum())


def test_refinement_changes_only_the_factors_and_is_never_worse_on_the_held_out_batch():
    model = tiny_model(num_hidden_layers=3)
    calib = calibration_ids(n=32, length=24)
    settings = dict(ratio=0.3, rank_multiple=8, min_calibration_tokens=16, calibration_batch_size=4)
    closed_model = ODLLMCompressor.from_pretrained(copy.deepcopy(model), config=ODLLMConfig(refine_steps=0, **settings)).compress(calib)
    refining = ODLLMCompressor.from_pretrained(copy.deepcopy(model), config=ODLLMConfig(refine_steps=48, refine_lr=1e-3, **settings))
    refined = refining.compress(calib)
    entries = refining.report.refinement
    assert [e["layer"] for e in entries] == [0, 1, 2]
    # layer 0 sees the same inputs in both runs; its held-out batch is the 8th of 8 (sequences 28-31): the
    # errors of the two stored models, computed from scratch, are the ones reported, and refinement won
    held = calib[28:32]
    closed_error, refined_error = _layer0_error(closed_model, model, held), _layer0_error(refined, model, held)
    assert entries[0]["steps"] > 0 and refined_error < 0.99 * closed_error
    assert closed_error == pytest.approx(entries[0]["held_out_before"], rel=1e-4)
    assert refined_error == pytest.approx(entries[0]["held_out_after"], rel=1e-4)
    closed_state, refined_state = closed_model.state_dict(), refined.state_dict()
    assert closed_state.keys() == refined_state.keys()
    changed = {k for k in closed_state if not torch.equal(closed_state[k], refined_state[k])}
    assert changed and all(k.endswith(("up.weight", "down.weight")) for k in changed)
    assert all(p.grad is None for p in refined.parameters())  # no gradient left behind on the model
    assert refined.config.quantization_config.refine_steps == 48


def test_layers_without_factorized_modules_are_not_refined():
    config = ODLLMConfig(ratio=0.5, rank_multiple=8, min_calibration_tokens=16, refine_steps=4,
                         target_modules=["layers.1.self_attn.q_proj"])
    compressor = ODLLMCompressor.from_pretrained(tiny_model(), config=config)
    compressor.compress(calibration_ids())
    assert list(compressor.config.ranks) == ["model.layers.1.self_attn.q_proj"]
    assert [e["layer"] for e in compressor.report.refinement] == [1]  # layer 0 has nothing to refine


def test_weights_return_to_their_own_dtypes():
    """A float32 norm inside a bfloat16 layer stays float32; the bfloat16 weights come back bfloat16."""
    _, batches = _linear_problem(seed=2)
    block = OneModuleBlock(LowRankLinear(16, 12, rank=4, bias=False)).to(torch.bfloat16)
    block.norm = nn.LayerNorm(16)  # float32, not used by forward
    block.register_buffer("scale", torch.ones(3, dtype=torch.float64))
    outcome = refine_block(block, [block.proj.down.weight, block.proj.up.weight], batches, 16, 1e-3, torch.device("cpu"))
    assert outcome.steps >= 0
    assert block.proj.up.weight.dtype == block.proj.down.weight.dtype == torch.bfloat16
    assert block.norm.weight.dtype == torch.float32 and block.scale.dtype == torch.float64


def test_refined_model_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    config = ODLLMConfig(ratio=0.5, rank_multiple=8, min_calibration_tokens=16, refine_steps=8, refine_lr=1e-3)
    compressed = ODLLMCompressor.from_pretrained(model, config=config).compress(calibration_ids())
    compressed.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = calibration_ids(n=2, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, compressed(ids).logits)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(refine_steps=-1), "refine_steps must be None .* or an integer >= 0"),
        (dict(refine_steps=1.5), "refine_steps must be None .* or an integer >= 0"),
        (dict(refine_lr=0.0), "refine_lr must be a positive number"),
        (dict(refine_lr=float("nan")), "refine_lr must be a positive number"),
    ],
)
def test_bad_refinement_settings_are_refused_with_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        ODLLMConfig(**settings)


def test_default_refines_with_calibration_data_and_not_on_the_data_free_path(monkeypatch):
    import optimum_odllm.refinement as refinement

    assert ODLLMConfig().refine_steps is None
    monkeypatch.undo()  # conftest shortens the default for the other tests: here the library's own value runs
    assert refinement.DEFAULT_REFINE_STEPS == 256
    assert refinement.resolve_refine_steps(None, calibrated=True) == 256
    assert refinement.resolve_refine_steps(None, calibrated=False) == 0
    assert refinement.resolve_refine_steps(0, calibrated=True) == 0
    compressor = ODLLMCompressor.from_pretrained(tiny_model(), config=ODLLMConfig(ratio=0.5, rank_multiple=8, min_calibration_tokens=16))
    compressor.compress(calibration_ids())
    assert [e["layer"] for e in compressor.report.refinement] == [0, 1]
    assert compressor.report.stage_seconds["refine"] > 0
    free = ODLLMCompressor.from_pretrained(
        tiny_model(), config=ODLLMConfig(ratio=0.5, rank_multiple=8, whitening=False, progressive=False)
    )
    free.compress()  # no calibration data: nothing to refine against, and no error for the default
    assert free.report.refinement == [] and "refine" not in free.report.stage_seconds


def test_integer_factors_are_rounded_after_refinement():
    """Layer 0 sees the same inputs with float and int8 factors: its int8 codes must be the rounding (RTN) of the
    refined float factors, not of the closed-form ones."""
    from optimum_odllm.quantization import QuantizedLowRankLinear

    model, calib = tiny_model(), calibration_ids(n=32, length=24)
    settings = dict(ratio=0.5, rank_multiple=8, min_calibration_tokens=16, calibration_batch_size=4, refine_steps=48,
                    refine_lr=1e-3)
    floats = ODLLMCompressor.from_pretrained(copy.deepcopy(model), config=ODLLMConfig(**settings)).compress(calib)
    ints = ODLLMCompressor.from_pretrained(
        copy.deepcopy(model), config=ODLLMConfig(factor_bits=8, factor_quantizer="rtn", **settings)
    ).compress(calib)
    closed = ODLLMCompressor.from_pretrained(copy.deepcopy(model), config=ODLLMConfig(**{**settings, "refine_steps": 0})).compress(calib)
    name = "model.layers.0.self_attn.q_proj"
    refined, quantized, unrefined = (m.get_submodule(name) for m in (floats, ints, closed))
    assert isinstance(quantized, QuantizedLowRankLinear)
    assert not torch.equal(refined.up.weight, unrefined.up.weight)  # refinement moved layer 0
    expected = QuantizedLowRankLinear.from_factors(refined.up.weight, refined.down.weight, refined.up.bias, None, 8, None, "rtn")
    for key, value in expected.state_dict().items():
        assert torch.equal(value, quantized.state_dict()[key]), key


def test_integer_factors_without_a_refinement_gain_are_the_closed_form_codes():
    """A refinement that keeps no step (a learning rate that diverges) must round the solver's own factors,
    giving exactly the integer codes of refine_steps=0."""
    model, calib = tiny_model(), calibration_ids(n=32, length=24)
    settings = dict(ratio=0.5, rank_multiple=8, min_calibration_tokens=16, calibration_batch_size=4, factor_bits=8)
    closed = ODLLMCompressor.from_pretrained(copy.deepcopy(model), config=ODLLMConfig(refine_steps=0, **settings)).compress(calib)
    diverging = ODLLMCompressor.from_pretrained(copy.deepcopy(model), config=ODLLMConfig(refine_steps=8, refine_lr=1e3, **settings))
    refined = diverging.compress(calib)
    assert [e["steps"] for e in diverging.report.refinement] == [0, 0]
    a, b = closed.state_dict(), refined.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refinement_without_calibration_data_is_refused():
    config = ODLLMConfig(ratio=0.5, rank_multiple=8, whitening=False, progressive=False, refine_steps=8)
    with pytest.raises(ValueError, match="refine_steps=0 for the data-free"):
        ODLLMCompressor.from_pretrained(tiny_model(), config=config).compress()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_model_refines_on_cuda_under_autocast_and_stays_bfloat16():
    model = tiny_model(num_hidden_layers=2).to(torch.bfloat16)
    config = ODLLMConfig(ratio=0.3, rank_multiple=8, min_calibration_tokens=16, calibration_batch_size=4,
                         refine_steps=32, refine_lr=1e-3)
    compressor = ODLLMCompressor.from_pretrained(model, config=config)
    compressed = compressor.compress(calibration_ids(n=32, length=24), device="cuda")
    entries = compressor.report.refinement
    assert len(entries) == 2 and all(e["held_out_after"] <= e["held_out_before"] for e in entries)
    assert any(e["steps"] > 0 for e in entries)
    assert {p.dtype for p in compressed.parameters()} == {torch.bfloat16}


def test_padding_positions_never_reach_the_refinement_objective():
    """Targets at masked (padding) positions set to garbage: the refinement takes exactly the same path."""
    weight, batches = _linear_problem(seed=3)
    padded = []
    for b in batches:
        mask = b.mask.clone()
        mask[:, -9:] = False
        target = b.target.clone()
        target[:, -9:] = 1e6
        padded.append(RefinementBatch(b.inputs, b.kwargs, mask, target))
    clean = [RefinementBatch(b.inputs, b.kwargs, p.mask, b.target) for b, p in zip(batches, padded)]
    results = []
    for data in (padded, clean):
        torch.manual_seed(0)
        block = OneModuleBlock(LowRankLinear(16, 12, rank=4, bias=False))
        outcome = refine_block(block, [block.proj.down.weight, block.proj.up.weight], data, 50, 1e-2, torch.device("cpu"))
        results.append((outcome, block.proj.up.weight.detach().clone()))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    assert results[0][0].held_out_after < results[0][0].held_out_before


def test_refinement_of_big_layers_on_a_cpu_warns_with_the_fix(monkeypatch, caplog):
    import optimum_odllm.pipeline as pipeline

    settings = dict(ratio=0.5, rank_multiple=8, min_calibration_tokens=16, refine_steps=2)

    def warnings_of(**overrides) -> str:
        caplog.clear()
        config = ODLLMConfig(**{**settings, **overrides})
        ODLLMCompressor.from_pretrained(tiny_model(), config=config).compress(calibration_ids(), device="cpu")
        return " ".join(r.getMessage() for r in caplog.records if "block refinement" in r.getMessage())

    monkeypatch.setattr(pipeline, "CPU_REFINE_WARN_PARAMS", 10**9)  # the tiny model is far below it: silent
    assert warnings_of() == ""
    monkeypatch.setattr(pipeline, "CPU_REFINE_WARN_PARAMS", 1000)  # every layer of the tiny model is above it
    text = warnings_of()
    assert "block refinement (2 steps per layer) runs on the CPU" in text and "refine_steps=0" in text
    assert warnings_of(refine_steps=0) == ""  # the closed form is never warned about
