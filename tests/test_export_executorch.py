"""ExecuTorch (XNNPACK) export of a compressed model, run with ExecuTorch's Python runtime, against PyTorch.

Skipped where executorch is not installed (it is the optional ``executorch`` extra, see docs/export.md).
"""

from __future__ import annotations

import pytest
import torch

from conftest import calibration_ids, tiny_model, word_tokenizer
from optimum_odllm import ODLLMCompressor, ODLLMConfig
from optimum_odllm.recsys.trie import PrefixTrie, constrained_beam_search

pytest.importorskip("executorch.runtime")

from optimum_odllm.cli import main  # noqa: E402
from optimum_odllm.exporters.common import FlatCacheCausalLM  # noqa: E402
from optimum_odllm.exporters.executorch import EtCausalLM, export_executorch  # noqa: E402


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory):
    """A compressed tiny Llama exported with the Python function; a Qwen2 saved, then exported by the CLI."""
    model = tiny_model(request.param)
    compressor = ODLLMCompressor(model, ODLLMConfig(ratio=0.5, rank_multiple=8), tokenizer=word_tokenizer())
    compressor.compress(calibration_ids())
    out = tmp_path_factory.mktemp(f"et-{request.param}")
    if request.param == "llama":
        path = export_executorch(model, out, max_batch=24, max_seq_len=32)
    else:
        compressor.save_pretrained(out / "odllm")
        path = out / "pte" / "model.pte"
        assert main(["export", "executorch", str(out / "odllm"), "-o", str(path.parent), "--max-batch", "24",
                     "--max-seq-len", "32"]) == 0
    return model, path.parent


def test_pte_logits_and_kv_cache_match_pytorch(exported):
    model, out = exported
    et_model = EtCausalLM(out)
    reference = FlatCacheCausalLM(model)
    prompts = calibration_ids(n=2, length=9, seed=5)
    mask = torch.ones_like(prompts)
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        expected = reference(prompts, mask, positions, *et_model.layout.empty_past(2))
    got = et_model(input_ids=prompts)
    assert got.logits.shape[1] == 1  # last position only (the default)
    torch.testing.assert_close(got.logits, expected[0][:, -1:], atol=1e-4, rtol=0)

    step = torch.tensor([[7], [11]])
    mask2 = torch.ones(2, 10, dtype=torch.long)
    with torch.no_grad():
        expected2 = reference(step, mask2, torch.full((2, 1), 9), *expected[1:])
    got2 = et_model(input_ids=step, past_key_values=got.past_key_values)
    torch.testing.assert_close(got2.logits, expected2[0], atol=1e-4, rtol=0)


def test_beam_search_rankings_equal_pytorch(exported):
    model, out = exported
    generator = torch.Generator().manual_seed(3)
    codes = sorted({tuple(row.tolist()) for row in torch.randint(10, 320, (40, 3), generator=generator)})
    trie = PrefixTrie(codes)
    prompts = torch.randint(4, 320, (2, 11), generator=generator)
    items, scores = constrained_beam_search(model, prompts, trie, num_beams=8)
    et_items, et_scores = constrained_beam_search(EtCausalLM(out), prompts, trie, num_beams=8)
    assert et_items == items
    torch.testing.assert_close(et_scores, scores, atol=1e-4, rtol=0)


def test_every_matmul_runs_in_xnnpack(exported):
    """No linear/matmul is left to ExecuTorch's portable kernels: XNNPACK runs the factors."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary((exported[1] / "model.pte").read_bytes())
    plan = getattr(program, "program", program).execution_plan[0]
    assert plan.delegates and {d.id for d in plan.delegates} == {"XnnpackBackend"}
    portable = {plan.operators[i.instr_args.op_index].name for i in plan.chains[0].instructions
                if type(i.instr_args).__name__ == "KernelCall"}
    assert not {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"} & portable


def test_calls_beyond_the_exported_bounds_fail_with_the_fix(exported):
    _, out = exported
    with pytest.raises(ValueError, match="max_batch"):
        EtCausalLM(out)(input_ids=torch.zeros(25, 3, dtype=torch.long))
