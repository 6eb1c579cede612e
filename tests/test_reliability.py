"""Reliability (issue 6): validation up front, numerics, safe loading, determinism, GPT-2 Conv1D."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config
from transformers.pytorch_utils import Conv1D

from conftest import VOCAB, calibration_ids, random_sentences, tiny_model, word_tokenizer
from optimum_odllm import LowRankLinear, ODLLMCompressor, ODLLMConfig, replace_with_lowrank_linear
from optimum_odllm.recsys.artifacts import validate_item_index_file
from optimum_odllm.linalg import NonFiniteError

PACKAGE = Path(__file__).resolve().parents[1] / "optimum_odllm"


def small_config(**overrides) -> ODLLMConfig:
    settings = dict(ratio=0.5, rank_multiple=8)
    settings.update(overrides)
    return ODLLMConfig(**settings)


def count_forwards(model) -> list:
    calls: list = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------- validation up front
@pytest.mark.parametrize("ratio", [0, -0.1, 1.0001, 2, float("nan"), float("inf"), True, "0.5", None])
def test_ratio_out_of_range_is_refused_with_the_fix(ratio):
    with pytest.raises(ValueError, match=r"ratio must be .*\(0, 1\]"):
        ODLLMConfig(ratio=ratio)


def test_unknown_target_modules_lists_available_names():
    with pytest.raises(ValueError, match=r"\['qkv'\].*Available module names: \[.*'q_proj'"):
        ODLLMCompressor(tiny_model(), small_config(target_modules=["q_proj", "qkv"])).target_modules()


@pytest.mark.parametrize(
    "data, config, message",
    [
        ([], {}, "empty"),
        (torch.zeros((0, 8), dtype=torch.long), {}, "empty"),
        ([[0] * 24] * 8, {}, "only padding"),  # the tokenizer's pad id is 0
        ({"input_ids": calibration_ids(4, 24), "attention_mask": torch.zeros(4, 24, dtype=torch.long)}, {}, "only padding"),
        (calibration_ids(2, 8), {"min_calibration_tokens": 64}, "fewer than min_calibration_tokens"),
        (torch.full((8, 24), VOCAB), {}, rf"must be in \[0, {VOCAB}\)"),
        ([[5, 6, -1] * 10] * 8, {}, r"sequence 0 contains token id -1"),
        (torch.full((8, 24), -3), {}, "non-negative"),
        ([[5, 6.5, 7] * 10] * 8, {}, "token ids must be integers"),
        ([[1, 2, 3], "text"], {}, "mixes strings and token ids"),
        (torch.rand(8, 24), {}, "LongTensor"),
    ],
)
def test_bad_calibration_data_fails_before_any_forward_pass(data, config, message):
    model = tiny_model()
    calls = count_forwards(model)
    comp = ODLLMCompressor(model, small_config(**config), tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match=message):
        comp.compress(data)
    assert calls == []
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_tokenizer_output_mapping_is_accepted_and_padding_masked():
    tok = word_tokenizer()
    texts = [" ".join(s.split()[: 10 + i]) for i, s in enumerate(random_sentences(8, 20))]  # ragged -> padding
    encoded = tok(texts, padding=True, return_tensors="pt")
    a, b = tiny_model(), tiny_model()
    # closed form (refine_steps=0): the statistics are what must ignore padding; batch size 1 vs 8 changes the
    # refinement's batches
    ODLLMCompressor(a, small_config(min_calibration_tokens=8, refine_steps=0), tokenizer=tok).compress(encoded)
    ODLLMCompressor(b, small_config(min_calibration_tokens=8, calibration_batch_size=1, refine_steps=0), tokenizer=tok).compress(
        [tok(t)["input_ids"] for t in texts]
    )
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    # GPTQ-style list of per-sample dicts gives the very same statistics
    c = tiny_model()
    samples = [{"input_ids": ids, "attention_mask": mask} for ids, mask in zip(encoded["input_ids"].tolist(), encoded["attention_mask"].tolist())]
    ODLLMCompressor(c, small_config(min_calibration_tokens=8, refine_steps=0), tokenizer=tok).compress(samples)
    for (name, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "existing, method",
    [
        (BitsAndBytesConfig(load_in_8bit=True), "bitsandbytes"),
        ({"quant_method": "gptq", "bits": 4}, "gptq"),
    ],
)
def test_already_quantized_model_is_refused(existing, method):
    model = tiny_model()
    model.config.quantization_config = existing
    with pytest.raises(ValueError, match=rf"already quantized with '{method}'.*unquantized checkpoint"):
        ODLLMCompressor(model, small_config()).compress(calibration_ids())


def test_already_compressed_model_is_refused_in_memory_and_after_reload(tmp_path, calib):
    comp = ODLLMCompressor(tiny_model(), small_config())
    comp.compress(calib)
    with pytest.raises(ValueError, match="already OD-LLM-compressed.*original dense model"):
        ODLLMCompressor(comp.model, small_config(ratio=0.3)).compress(calib)
    comp.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already OD-LLM-compressed.*smaller ratio"):
        ODLLMCompressor(reloaded, small_config(ratio=0.3)).compress(calib)
    del reloaded.config.quantization_config  # even without the config, the modules give it away
    with pytest.raises(ValueError, match="already contains LowRankLinear"):
        ODLLMCompressor(reloaded, small_config(ratio=0.3)).target_modules()
    from optimum_odllm.fused import fuse_shared_inputs

    fuse_shared_inputs(reloaded)  # the fused inference form is recognized too
    with pytest.raises(ValueError, match=r"already contains .*OD-LLM-compressed"):
        ODLLMCompressor(reloaded, small_config(ratio=0.3)).target_modules()


def gpt2_model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=3)
    return AutoModelForCausalLM.from_config(config).eval()


def test_gpt2_conv1d_compress_save_reload_identical_logits(tmp_path, calib):
    model = gpt2_model()
    dense = copy.deepcopy(model)
    comp = ODLLMCompressor(model, small_config())
    comp.compress(calib)
    block = model.transformer.h[0]
    assert all(isinstance(m, LowRankLinear) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))
    # the factors approximate the Conv1D's x @ W (weight stored [in, out]), not its transpose
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = dense.transformer.h[0].mlp.c_fc(x)
        assert float((block.mlp.c_fc(x) - ref).norm() / ref.norm()) < 0.9
    comp.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.transformer.h[1].mlp.c_fc, LowRankLinear)
    with torch.no_grad():
        assert torch.equal(model(calib).logits, reloaded(calib).logits)


def test_unsupported_module_type_in_ranks_is_refused_naming_it():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"model.layers.0.input_layernorm' is a LlamaRMSNorm, expected nn.Linear"):
        replace_with_lowrank_linear(model, {"model.layers.0.input_layernorm": 4})
    with pytest.raises(ValueError, match=r"ranks\['model.layers.0.mlp.up_proj'\] = 999 is not in \[1, 64\]"):
        replace_with_lowrank_linear(model, {"model.layers.0.mlp.up_proj": 999})
    conv = Conv1D(48, 16)  # nf=48 outputs, nx=16 inputs
    holder = torch.nn.Module()
    holder.proj = conv
    replace_with_lowrank_linear(holder, {"proj": 8})
    assert (holder.proj.in_features, holder.proj.out_features, holder.proj.rank) == (16, 48, 8)


def write_index(path: Path, codes) -> Path:
    path.write_text(json.dumps({"levels": len(codes[0]), "item_ids": [str(i) for i in range(len(codes))], "codes": codes}))
    return path


def test_item_index_that_does_not_match_the_tokenizer_is_refused_up_front(tmp_path, calib):
    from optimum_odllm.recsys.instructions import add_index_tokens
    from optimum_odllm.recsys.indexing import ItemIndex

    codes = [[0, 1], [1, 0], [2, 2]]
    index_file = write_index(tmp_path / "item_index.json", codes)
    model = tiny_model()
    calls = count_forwards(model)
    comp = ODLLMCompressor(model, small_config(), tokenizer=word_tokenizer())
    comp.artifacts["item_index.json"] = index_file
    with pytest.raises(ValueError, match=r"does not match the tokenizer: 6 of its 6 index tokens \(e.g. <a_0>\)"):
        comp.compress(calib)
    assert calls == []

    tok = word_tokenizer()
    add_index_tokens(tok, ItemIndex(codes=[tuple(c) for c in codes]))  # tokens added, embeddings not resized
    with pytest.raises(ValueError, match=rf"beyond the model's {VOCAB} embeddings.*resize_token_embeddings"):
        validate_item_index_file(index_file, tok, VOCAB)
    assert validate_item_index_file(index_file, tok, len(tok)).codes == [tuple(c) for c in codes]
    write_index(index_file, [[0, 1], [0, 1]])
    with pytest.raises(ValueError, match="share codes"):
        validate_item_index_file(index_file, tok, len(tok))


# ---------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_compress_close_to_float32(dtype):
    ids = calibration_ids(16, 24)
    full = tiny_model()
    half = copy.deepcopy(full).to(dtype)
    ODLLMCompressor(full, small_config()).compress(ids)
    comp = ODLLMCompressor(half, small_config())
    comp.compress(ids)
    eps = torch.finfo(dtype).eps
    errors = []
    for name in comp.config.ranks:
        got, want = half.get_submodule(name), full.get_submodule(name)
        assert got.down.weight.dtype == dtype and got.up.weight.dtype == dtype
        with torch.no_grad():
            w_half, w_full = got.weight.double(), want.weight.double()
        assert torch.isfinite(w_half).all()
        errors.append(float((w_half - w_full).norm() / w_full.norm()) / eps)
    # statistics accumulated and factors solved in float64 from half-precision activations: the result
    # differs from the float32 run by about one rounding of the weights (drift through layers aside)
    assert sorted(errors)[len(errors) // 2] < 2, errors
    assert max(errors) < 40, errors
    with torch.no_grad():
        assert torch.isfinite(half(ids).logits).all()


def test_nan_weight_is_reported_with_module_name_before_work(calib):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 7] = float("nan")
    calls = count_forwards(model)
    with pytest.raises(NonFiniteError, match=r"weight of model.layers.1.mlp.up_proj contains 1 NaN/Inf"):
        ODLLMCompressor(model, small_config()).compress(calib)
    assert calls == []


def test_inf_activation_is_reported_with_module_name(calib):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"input activations of model.layers.1.mlp.gate_proj contains"):
        ODLLMCompressor(model, small_config()).compress(calib)


def test_dead_channels_get_jitter_with_a_logged_warning(caplog, calib):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[:10] = 0  # q/k/v never see these 10 channels
    comp = ODLLMCompressor(model, small_config())
    with caplog.at_level("WARNING"):
        comp.compress(calib)
    assert re.search(r"input covariance of model.layers.0.self_attn.q_proj is not positive definite.*jitter", caplog.text)
    reports = {m.name: m for m in comp.report.modules}
    assert reports["model.layers.0.self_attn.q_proj"].jitter > 0
    assert reports["model.layers.0.mlp.gate_proj"].jitter == 0
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()


def test_tiny_calibration_set_is_handled_with_jitter(caplog):
    model = tiny_model()
    ids = calibration_ids(2, 8)  # 16 tokens for 64- and 160-dimensional inputs: rank-deficient covariances
    with caplog.at_level("WARNING"):
        ODLLMCompressor(model, small_config(min_calibration_tokens=16)).compress(ids)
    assert "not positive definite" in caplog.text
    assert "has 16 non-padding tokens, fewer than the 160 inputs of model.layers.0.mlp.down_proj" in caplog.text
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            assert torch.isfinite(module.weight).all()


def test_ratio_one_keeps_everything_dense_and_saves_a_plain_checkpoint(tmp_path, calib, caplog):
    model = tiny_model()
    before = state(model)
    comp = ODLLMCompressor(model, small_config(ratio=1.0))
    with caplog.at_level("WARNING"):
        comp.compress(calib)
    assert "leaves every targeted module dense" in caplog.text
    assert all(m.rank is None for m in comp.report.modules) and len(comp.report.modules) == 14
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    comp.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(calib).logits, reloaded(calib).logits)


def test_modules_whose_factorization_would_not_save_parameters_stay_dense(calib, monkeypatch):
    import optimum_odllm.pipeline as pipeline_module

    real = pipeline_module.allocate_ranks
    k_proj = "model.layers.0.self_attn.k_proj"  # 64 -> 32: rank 22 would hold 22 * 96 = 2112 >= 2048 parameters

    def allocate(shapes, ratio, multiple, *args, **kwargs):
        ranks = real(shapes, ratio, multiple, *args, **kwargs)
        ranks[k_proj] = 22
        return ranks

    monkeypatch.setattr(pipeline_module, "allocate_ranks", allocate)
    model = tiny_model()
    dense_k = model.get_submodule(k_proj).weight.detach().clone()
    comp = ODLLMCompressor(model, small_config(ratio=0.9, rank_multiple=1))
    comp.compress(calib)
    assert type(model.get_submodule(k_proj)) is torch.nn.Linear
    assert torch.equal(model.get_submodule(k_proj).weight, dense_k)
    assert k_proj not in comp.config.ranks
    for report in comp.report.modules:
        if report.rank is None:
            assert type(model.get_submodule(report.name)) is torch.nn.Linear
        else:
            assert report.rank * (report.in_features + report.out_features) < report.in_features * report.out_features
    assert {m.name: m.rank for m in comp.report.modules}[k_proj] is None


# ---------------------------------------------------------------------------------- safe loading
@pytest.fixture
def saved(tmp_path, calib):
    comp = ODLLMCompressor(tiny_model(), small_config())
    comp.compress(calib)
    comp.save_pretrained(tmp_path / "ok")
    return tmp_path / "ok"


def rewrite(directory: Path, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


Q = "model.layers.1.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(f"{Q}.down.weight"), rf"module '{Q}': factor '{Q}.down.weight' is missing"),
        (lambda t: t.__setitem__(f"{Q}.weight", torch.zeros(64, 64)), rf"module '{Q}': unexpected tensor '{Q}.weight'"),
        (
            lambda t: t.__setitem__(f"{Q}.up.weight", torch.zeros(64, 5)),
            rf"module '{Q}': '{Q}.up.weight' has shape \[64, 5\], expected \[64, \d+\]",
        ),
        (
            lambda t: t.__setitem__("model.layers.1.mlp.extra.down.weight", torch.zeros(4, 64)),
            r"module 'model.layers.1.mlp.extra': the checkpoint has factor .* does not list this module",
        ),
    ],
)
def test_checkpoint_with_missing_extra_or_misshaped_factor_fails_naming_the_module(saved, edit, message):
    rewrite(saved, edit)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(saved)


def test_checkpoint_with_nan_factor_fails_naming_the_module(saved):
    rewrite(saved, lambda t: t[f"{Q}.down.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(NonFiniteError, match=rf"loaded factor {Q}.down.weight"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_pickle_checkpoints_are_refused(saved):
    tensors = load_file(saved / "model.safetensors")
    (saved / "model.safetensors").unlink()
    torch.save(tensors, saved / "pytorch_model.bin")
    with pytest.raises((ValueError, OSError), match="safetensors"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_saved_artifact_is_safetensors_json_only_and_loads_without_remote_code(saved, calib):
    suffixes = {p.suffix for p in saved.iterdir()}
    assert suffixes <= {".safetensors", ".json", ".md"}, suffixes
    assert "auto_map" not in json.loads((saved / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=False)
    comp = ODLLMCompressor(tiny_model(), small_config())
    comp.compress(calib)
    with pytest.raises(ValueError, match="safetensors only"):
        comp.save_pretrained(saved.parent / "pickled", safe_serialization=False)


def test_package_never_unpickles():
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        assert not re.search(r"import pickle|pickle\.loads?\(|from pickle", source), path
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, (path, call)


# ---------------------------------------------------------------------------------- determinism
def test_same_inputs_give_bit_identical_weights(calib):
    results = []
    for _ in range(2):
        model = tiny_model(num_hidden_layers=3)
        ODLLMCompressor(model, small_config()).compress(calib)
        results.append(state(model))
    assert results[0].keys() == results[1].keys()
    assert any(k.endswith(".down.weight") for k in results[0])
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
