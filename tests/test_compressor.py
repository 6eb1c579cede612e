"""End-to-end behaviour of ODLLMCompressor on tiny Llama / Qwen2 / Mistral models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import calibration_ids, random_sentences, tiny_model, word_tokenizer
from optimum_odllm import LowRankLinear, ODLLMCompressor, ODLLMConfig, count_parameters


def collect_module_inputs(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs each named Linear receives in a forward pass of ``model`` (reference, independent of hooks in the package)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach().double()))
        for n in names
    ]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {n: x.reshape(-1, x.shape[-1]) for n, x in seen.items()}


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1].double()


def test_one_shot_module_error_matches_eckart_young():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    ids = calibration_ids(32, 32)
    comp = ODLLMCompressor.from_pretrained(model, config=ODLLMConfig(ratio=0.5, progressive=False, rank_multiple=8))
    comp.compress(ids)
    names = [m.name for m in comp.report.modules]
    inputs = collect_module_inputs(dense, names, ids)  # original-model inputs, as in one-shot mode
    for report in comp.report.modules:
        x = inputs[report.name]
        w = dense.get_submodule(report.name).weight.double()
        w_new = model.get_submodule(report.name).weight.double()
        error = float(((x @ w.T - x @ w_new.T) ** 2).sum())
        # independent reference: squared singular values of W S beyond the kept rank
        sigma = torch.linalg.svdvals(w @ torch.linalg.cholesky(x.T @ x))
        optimum = float((sigma[report.rank:] ** 2).sum())
        assert error == pytest.approx(optimum, rel=0.02), report.name


def test_whitening_beats_plain_svd_end_to_end():
    ids = calibration_ids(32, 32)
    dense = tiny_model("llama")
    ref = final_hidden(dense, ids)
    errors = {}
    for whitening in (True, False):
        model = copy.deepcopy(dense)
        ODLLMCompressor(model, ODLLMConfig(ratio=0.5, whitening=whitening, progressive=False, rank_multiple=8)).compress(ids)
        errors[whitening] = float(((final_hidden(model, ids) - ref) ** 2).sum())
    assert errors[True] < errors[False]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_progressive_alignment_lowers_hidden_state_error(arch):
    ids = calibration_ids(48, 32)
    dense = tiny_model(arch, num_hidden_layers=4)
    ref = final_hidden(dense, ids)
    errors = {}
    for progressive in (True, False):
        model = copy.deepcopy(dense)
        ODLLMCompressor(model, ODLLMConfig(ratio=0.4, progressive=progressive, rank_multiple=8)).compress(ids)
        errors[progressive] = float(((final_hidden(model, ids) - ref) ** 2).sum())
    assert errors[True] < errors[False]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_save_and_reload_logits_match(arch, tmp_path):
    model = tiny_model(arch)
    ids = calibration_ids()
    comp = ODLLMCompressor.from_pretrained(model, config=ODLLMConfig(ratio=0.5, rank_multiple=8))
    compressed = comp.compress(ids)
    with torch.no_grad():
        expected = compressed(ids).logits
    comp.save_pretrained(tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(reloaded.get_submodule("model.layers.0.self_attn.q_proj"), LowRankLinear)
    with torch.no_grad():
        got = reloaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert reloaded.config.quantization_config.ranks == comp.config.ranks


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_kept_parameter_ratio(ratio):
    model = tiny_model("llama", hidden_size=128, intermediate_size=320)
    targets = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n)
    before = count_parameters(model)
    comp = ODLLMCompressor(model, ODLLMConfig(ratio=ratio, rank_multiple=8))
    comp.compress(calibration_ids())
    kept = sum(
        p.numel() for n, m in model.named_modules() if isinstance(m, LowRankLinear) for p in m.parameters()
    )
    assert kept <= ratio * targets
    assert kept >= 0.9 * ratio * targets
    assert comp.report.target_params_after == kept
    assert before - count_parameters(model) == targets - kept


def test_tied_embeddings_stay_tied_and_untouched():
    model = tiny_model("llama", tie_word_embeddings=True)
    emb = model.get_input_embeddings().weight.detach().clone()
    ODLLMCompressor(model, ODLLMConfig(ratio=0.5, rank_multiple=8)).compress(calibration_ids())
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, emb)


def test_target_modules_subset_and_shared_covariance():
    model = tiny_model("llama")
    comp = ODLLMCompressor(model, ODLLMConfig(ratio=0.5, target_modules=["q_proj", "k_proj"], rank_multiple=8))
    comp.compress(calibration_ids())
    assert set(comp.config.ranks) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj")}
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


@pytest.mark.parametrize(
    "data",
    [
        calibration_ids(),
        calibration_ids().tolist(),
        random_sentences(),
    ],
    ids=["tensor", "token-lists", "strings"],
)
def test_calibration_forms_give_same_result(data):
    tok = word_tokenizer()
    reference = tiny_model("llama")
    ODLLMCompressor(reference, ODLLMConfig(ratio=0.5, rank_multiple=8), tokenizer=tok).compress(calibration_ids())
    model = tiny_model("llama")
    if isinstance(data[0], str):
        # same token ids as the strings' words (w{i} -> i + 4), no special tokens in a WordLevel tokenizer
        ids = torch.tensor([[int(w[1:]) + 4 for w in s.split()] for s in data])
        reference = tiny_model("llama")
        ODLLMCompressor(reference, ODLLMConfig(ratio=0.5, rank_multiple=8)).compress(ids)
    ODLLMCompressor(model, ODLLMConfig(ratio=0.5, rank_multiple=8), tokenizer=tok).compress(data)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_datasets_input_and_padding_excluded():
    from datasets import Dataset

    ids = calibration_ids(8, 24)
    ragged = [row[: 12 + i].tolist() for i, row in enumerate(ids)]  # different lengths -> padding
    # closed form: the statistics must not see padding (block refinement's batching differs with the batch size;
    # its own padding mask is tested in test_refinement.py)
    settings = dict(ratio=0.5, rank_multiple=8, min_calibration_tokens=8, refine_steps=0)
    a = tiny_model("llama")
    ODLLMCompressor(a, ODLLMConfig(**settings)).compress(Dataset.from_dict({"input_ids": ragged}))
    # Reference: each sequence alone (batch size 1, no padding at all).
    b = tiny_model("llama")
    ODLLMCompressor(b, ODLLMConfig(calibration_batch_size=1, **settings)).compress(ragged)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_from_pretrained_local_directory_and_quantize(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    word_tokenizer().save_pretrained(tmp_path / "base")
    comp = ODLLMCompressor.from_pretrained(tmp_path / "base", config=ODLLMConfig(ratio=0.5, rank_multiple=8))
    assert comp.tokenizer is not None
    out = comp.quantize(tmp_path / "out", calibration_dataset=random_sentences())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.quantization_config.ratio == 0.5
    assert (out / "tokenizer.json").exists()


def test_clear_errors_before_any_work():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ODLLMConfig(ratio=1.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ODLLMConfig(ratio=0)
    comp = ODLLMCompressor(model, ODLLMConfig(ratio=0.5))
    with pytest.raises(ValueError, match="empty"):
        comp.compress([])
    with pytest.raises(ValueError, match="No calibration data"):
        comp.compress(None)
    with pytest.raises(ValueError, match="min_calibration_tokens"):
        comp.compress(torch.randint(0, 100, (1, 8)))
    with pytest.raises(ValueError, match="tokenizer"):
        comp.compress(["some text without a tokenizer"] * 8)
    with pytest.raises(ValueError, match="vocabulary"):
        comp.compress(torch.full((4, 32), 10_000))
    with pytest.raises(ValueError, match="target_modules"):
        ODLLMCompressor(model, ODLLMConfig(target_modules=["not_a_layer"])).compress(calibration_ids())
    # nothing was touched by the failed calls
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_no_targetable_linear_layers():
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8)])

    with pytest.raises(ValueError, match="no nn.Linear"):
        ODLLMCompressor(NoLinear(), ODLLMConfig()).target_modules()


def test_plain_svd_without_data_is_data_free():
    model = tiny_model("llama")
    dense_q = model.model.layers[0].self_attn.q_proj.weight.detach().double().clone()
    comp = ODLLMCompressor(model, ODLLMConfig(ratio=0.5, whitening=False, progressive=False, rank_multiple=8))
    comp.compress()
    rank = comp.config.ranks["model.layers.0.self_attn.q_proj"]
    approx = model.model.layers[0].self_attn.q_proj.weight.double()
    sigma = torch.linalg.svdvals(dense_q)
    assert float(((dense_q - approx) ** 2).sum()) == pytest.approx(float((sigma[rank:] ** 2).sum()), rel=1e-5)


def test_alignment_damping_keeps_factors_bounded_on_rank_deficient_calibration():
    """Few distinct tokens make layer-0 inputs rank-deficient; undamped least squares then explodes."""
    dense = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(3, 13, (24, 24), generator=torch.Generator().manual_seed(0))  # only 10 distinct tokens
    largest = {}
    for progressive, damping in [(False, 0.0), (True, 0.0), (True, 0.01)]:
        model = copy.deepcopy(dense)
        config = ODLLMConfig(ratio=0.5, progressive=progressive, alignment_damping=damping, rank_multiple=8,
                             allow_undamped_alignment=True)
        ODLLMCompressor(model, config).compress(ids)
        largest[(progressive, damping)] = max(
            float((m.up.weight @ m.down.weight).abs().max()) for m in model.modules() if isinstance(m, LowRankLinear)
        )
    assert largest[(True, 0.0)] > 10 * largest[(False, 0.0)]  # the failure mode is real...
    assert largest[(True, 0.01)] < 3 * largest[(False, 0.0)]  # ...and damping removes it
