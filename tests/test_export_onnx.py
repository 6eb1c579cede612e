"""ONNX export of compressed models, checked against PyTorch: logits, KV cache, graph structure, beam search."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import calibration_ids, tiny_model, word_tokenizer
from optimum_odllm import LowRankLinear, ODLLMCompressor, ODLLMConfig
from optimum_odllm.recsys.trie import PrefixTrie, constrained_beam_search

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from optimum_odllm.exporters import OrtCausalLM, export_onnx  # noqa: E402
from optimum_odllm.exporters.common import FlatCacheCausalLM  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ITEM_INDEX = {"levels": 2, "item_ids": ["a", "b"], "codes": [[0, 1], [1, 0]]}
INDEX_TOKENS = ("<a_0>", "<a_1>", "<b_0>", "<b_1>")


def compressed(arch: str):
    model = tiny_model(arch)
    compressor = ODLLMCompressor(model, ODLLMConfig(ratio=0.5, rank_multiple=8), tokenizer=word_tokenizer())
    compressor.compress(calibration_ids())
    return compressor


@pytest.fixture(scope="module", params=[("llama", False), ("qwen2", True)], ids=["llama-last", "qwen2-all"])
def exported(request, tmp_path_factory):
    """A compressed tiny model saved like `optimum-cli odllm compress` does, then exported from its directory
    (Llama with last-position logits only, the default; Qwen2 with logits for every position)."""
    arch, all_logits = request.param
    root = tmp_path_factory.mktemp(arch)
    compressor = compressed(arch)
    compressor.save_pretrained(root / "odllm")
    (root / "odllm" / "item_index.json").write_text(json.dumps(ITEM_INDEX))
    word_tokenizer(INDEX_TOKENS).save_pretrained(root / "odllm")  # a recommender's tokenizer holds its index tokens
    export_onnx(root / "odllm", root / "onnx", all_logits=all_logits)
    return compressor.model, root


def reference(model, *inputs):
    with torch.no_grad():
        return FlatCacheCausalLM(model)(*inputs)


def test_export_writes_graph_tokenizer_and_item_index(exported):
    _, root = exported
    out = root / "onnx"
    assert (out / "model.onnx").is_file()
    copied = ["item_index.json", "tokenizer.json", "tokenizer_config.json"]
    for name in copied:
        assert (out / name).read_bytes() == (root / "odllm" / name).read_bytes(), name
    from transformers import PreTrainedTokenizerFast

    text = "w5 w17 w250"
    assert PreTrainedTokenizerFast.from_pretrained(out)(text)["input_ids"] == word_tokenizer()(text)["input_ids"]


def test_prefill_and_decode_logits_match_pytorch(exported):
    model, root = exported
    ort_model = OrtCausalLM(root / "onnx")
    prompts = calibration_ids(n=2, length=9, seed=5)
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0  # left padding: padded positions are never compared, their logits are meaningless
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    empty = ort_model.layout.empty_past(2)
    expected = reference(model, prompts, mask, positions, *empty)
    got = ort_model(input_ids=prompts, attention_mask=mask, position_ids=positions)
    kept = got.logits.shape[1]
    assert kept == (9 if json.loads((root / "onnx" / "odllm_export.json").read_text())["all_logits"] else 1)
    valid = mask[:, -kept:].bool()
    torch.testing.assert_close(got.logits[valid], expected[0][:, -kept:][valid], atol=1e-4, rtol=0)

    # one decode step fed with the KV cache ONNX Runtime returned, against PyTorch fed with its own cache
    step = torch.tensor([[7], [11]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    pos2 = positions[:, -1:] + 1
    expected2 = reference(model, step, mask2, pos2, *expected[1:])
    got2 = ort_model(input_ids=step, attention_mask=mask2, position_ids=pos2, past_key_values=got.past_key_values)
    torch.testing.assert_close(got2.logits, expected2[0], atol=1e-4, rtol=0)
    for ours, theirs in zip(got2.past_key_values.tensors, expected2[1:]):
        assert ours.shape == theirs.shape == (2, model.config.num_key_value_heads, 10, ours.shape[-1])


def test_graph_keeps_two_matmuls_per_factorized_projection(exported):
    model, root = exported
    graph = onnx.load(str(root / "onnx" / "model.onnx")).graph
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    gemms = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    matmul_weights = [weights[n.input[1]] for n in gemms if n.op_type == "MatMul"]

    def used(matrix: torch.Tensor) -> int:
        target = matrix.detach().numpy()
        return sum(w.shape == target.shape and np.allclose(w, target, atol=1e-6) for w in matmul_weights)

    factorized = [(name, m) for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert len(factorized) == len(model.config.quantization_config.ranks) > 0
    for name, module in factorized:
        assert used(module.down.weight.T) >= 1, f"{name}: no MatMul with the down factor"
        assert used(module.up.weight.T) >= 1, f"{name}: no MatMul with the up factor"
        assert used(module.weight.T) == 0, f"{name}: the merged dense weight is in the graph"
    # one product per nn.Linear: both factors of each projection, the lm_head (a Gemm when only the last
    # position's logits are exported) and any linear left dense; nothing merged in between
    dense_linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(gemms) == len(dense_linears)


def test_constrained_beam_search_rankings_equal_pytorch(exported):
    """A tiny recommender: 3-token item codes in a trie, beam 8, batch of prompts with and without padding."""
    model, root = exported
    ort_model = OrtCausalLM(root / "onnx")
    generator = torch.Generator().manual_seed(3)
    codes = sorted({tuple(row.tolist()) for row in torch.randint(10, 320, (60, 3), generator=generator)})
    trie = PrefixTrie(codes)
    prompts = torch.randint(4, 320, (3, 11), generator=generator)
    items, scores = constrained_beam_search(model, prompts, trie, num_beams=8)
    ort_items, ort_scores = constrained_beam_search(ort_model, prompts, trie, num_beams=8)
    assert ort_items == items
    torch.testing.assert_close(ort_scores, scores, atol=1e-4, rtol=0)

    mask = torch.ones_like(prompts)
    mask[0, :4] = 0
    items, scores = constrained_beam_search(model, prompts, trie, num_beams=8, attention_mask=mask)
    ort_items, ort_scores = constrained_beam_search(ort_model, prompts, trie, num_beams=8, attention_mask=mask)
    assert ort_items == items
    torch.testing.assert_close(ort_scores, scores, atol=1e-4, rtol=0)


def test_runner_refuses_a_filled_transformers_cache(exported):
    from transformers.cache_utils import DynamicCache

    model, root = exported
    ids = calibration_ids(n=1, length=4)
    filled = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
    with pytest.raises(TypeError, match="first call"):
        OrtCausalLM(root / "onnx")(input_ids=ids[:, :1], past_key_values=filled)


def test_dequantize_merges_factors_and_saves_a_plain_checkpoint(tmp_path):
    compressor = compressed("llama")
    model = compressor.model
    ids = calibration_ids(n=2, length=12, seed=9)
    with torch.no_grad():
        lowrank_logits = model(ids).logits
    dense = model.dequantize()
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert getattr(dense.config, "quantization_config", None) is None and not dense.is_quantized
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, lowrank_logits, atol=1e-5, rtol=1e-5)

    dense.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    torch.save({"ids": ids, "logits": lowrank_logits}, tmp_path / "expected.pt")
    # a fresh process that never imports optimum_odllm: plain transformers must load it
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); e = torch.load(sys.argv[2])\n"
        "assert 'optimum_odllm' not in sys.modules\n"
        "with torch.no_grad(): torch.testing.assert_close(m(e['ids']).logits, e['logits'], atol=1e-5, rtol=1e-5)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dense"), str(tmp_path / "expected.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_optimum_cli_export_with_dequantize_gives_a_dense_graph_with_the_same_logits(tmp_path):
    """Through the installed `optimum-cli` entry point, as a user runs it (the register module, not a test parser)."""
    compressor = compressed("llama")
    compressor.save_pretrained(tmp_path / "odllm")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))  # the register module, before/without `pip install -e .`
    cli = Path(sys.executable).with_name("optimum-cli")
    result = subprocess.run([str(cli), "odllm", "export", "onnx", str(tmp_path / "odllm"), "-o", str(tmp_path / "dense"),
                             "--dequantize"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    path = tmp_path / "dense" / "model.onnx"
    assert f"wrote {path}" in result.stdout

    graph = onnx.load(str(path)).graph
    shapes = {tuple(t.dims) for t in graph.initializer}
    for name, module in compressor.model.named_modules():
        if isinstance(module, LowRankLinear):  # the merged [in, out] weight is there, the rank-r factors are not
            assert (module.in_features, module.out_features) in shapes, name
            assert (module.in_features, module.rank) not in shapes, name
    prompts = calibration_ids(n=2, length=7, seed=4)
    with torch.no_grad():
        expected = compressor.model(prompts).logits[:, -1:]
    torch.testing.assert_close(OrtCausalLM(path.parent)(input_ids=prompts).logits, expected, atol=1e-4, rtol=0)


def test_console_script_exports_a_factored_graph_and_names_the_extra_when_missing(tmp_path, monkeypatch, capsys):
    """`optimum-odllm export onnx` writes the same graph as export_onnx; without onnxscript it says which extra."""
    import importlib.util

    from optimum_odllm.cli import main

    compressor = compressed("qwen2")
    compressor.save_pretrained(tmp_path / "odllm")
    assert main(["export", "onnx", str(tmp_path / "odllm"), "-o", str(tmp_path / "onnx")]) == 0
    shapes = {tuple(t.dims) for t in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.initializer}
    factors = [m for m in compressor.model.modules() if isinstance(m, LowRankLinear)]
    assert factors and all((m.in_features, m.rank) in shapes for m in factors)
    ids = calibration_ids(n=2, length=6, seed=2)
    with torch.no_grad():
        expected = compressor.model(ids).logits[:, -1:]
    torch.testing.assert_close(OrtCausalLM(tmp_path / "onnx")(input_ids=ids).logits, expected, atol=1e-4, rtol=0)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "onnx", str(tmp_path / "odllm"), "-o", str(tmp_path / "again")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ONNX export needs onnxscript")
    assert 'pip install "optimum-odllm[export]"' in err and not (tmp_path / "again").exists()


@pytest.mark.skipif(importlib.util.find_spec("executorch") is not None, reason="executorch is installed here")
def test_executorch_export_without_executorch_names_the_extra(tmp_path, capsys):
    from optimum_odllm.cli import main

    compressed("llama").save_pretrained(tmp_path / "odllm")
    capsys.readouterr()  # the compression's progress bars
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "executorch", str(tmp_path / "odllm"), "-o", str(tmp_path / "pte")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ['error: ExecuTorch export needs executorch, which is not installed: '
                                'pip install "optimum-odllm[executorch]"']


def test_export_into_a_directory_with_files_keeps_them_and_refuses_the_model_directory(tmp_path):
    model_dir = tmp_path / "odllm"
    compressed("llama").save_pretrained(model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="source model"):
        export_onnx(model_dir, model_dir)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    export_onnx(model_dir, out)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model.onnx").is_file()


@pytest.mark.parametrize("problem", ["corrupt", "foreign tokens"])
def test_export_refuses_a_bad_item_index_before_exporting(tmp_path, monkeypatch, problem):
    # exports run the same artifact hooks as saves, before the export itself: a corrupt item_index.json, or one
    # whose tokens the saved tokenizer does not know (an index built for another model), is refused
    model_dir = tmp_path / "odllm"
    compressed("llama").save_pretrained(model_dir)
    index = "{not json" if problem == "corrupt" else json.dumps(ITEM_INDEX)  # the saved tokenizer has no <a_0>
    (model_dir / "item_index.json").write_text(index)
    exported = []
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: exported.append(1))
    out = tmp_path / "onnx"
    with pytest.raises(ValueError, match="item_index.json|Item index file"):
        export_onnx(model_dir, out)
    assert not exported and (not out.exists() or not any(out.iterdir()))


def test_a_fused_model_exports_with_batched_up_products_and_the_same_logits(tmp_path):
    from optimum_odllm.fused import fuse_shared_inputs

    model = tiny_model("llama", num_key_value_heads=4)  # q/k/v and gate/up: equal-shaped up factors
    ODLLMCompressor(model, ODLLMConfig(ratio=0.5, rank_multiple=8)).compress(calibration_ids())
    fused = copy.deepcopy(model)
    assert fuse_shared_inputs(fused) == 4
    export_onnx(fused, tmp_path / "fused")
    export_onnx(model, tmp_path / "plain")
    matmuls = {}
    for name in ("fused", "plain"):
        graph = onnx.load(str(next((tmp_path / name).glob("*.onnx"))))
        matmuls[name] = sum(node.op_type in ("MatMul", "Gemm") for node in graph.graph.node)
    # export traces the batched path: per layer q/k/v 2 products instead of 6, gate/up 2 instead of 4
    assert matmuls["plain"] - matmuls["fused"] == 2 * (4 + 2)
    prompts = calibration_ids(n=2, length=9, seed=5)
    mask = torch.ones_like(prompts)
    positions = mask.cumsum(-1) - 1
    ort_model = OrtCausalLM(tmp_path / "fused")
    expected = reference(model, prompts, mask, positions, *ort_model.layout.empty_past(2))
    got = ort_model(input_ids=prompts, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(got.logits, expected[0][:, -got.logits.shape[1]:], atol=1e-4, rtol=0)
