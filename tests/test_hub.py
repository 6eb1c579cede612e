"""push_to_hub: one commit with exactly the expected files (mocked HfApi), and loading the Hub layout back."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import calibration_ids
from hub_helpers import RecordingApi, compressed

import optimum_odllm.hub as hub

EXPECTED_FILES = {
    "README.md", "config.json", "generation_config.json", "model.safetensors", "odllm_report.json",
    "item_index.json", "tokenizer.json", "tokenizer_config.json",
}


@pytest.fixture
def api(monkeypatch):
    recorder = RecordingApi()
    monkeypatch.setattr(hub, "HfApi", recorder)
    return recorder


def test_compressor_push_is_one_commit_with_expected_files(tmp_path, api):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    compressor = compressed(tmp_path)
    info = compressor.push_to_hub(
        "me/tiny-rec-odllm", private=True, revision="v1", token="hf_test",
        eval_results={"ml-100k": {"HR@10": 0.3}},
    )
    assert info.commit_url.startswith("https://huggingface.co/me/tiny-rec-odllm")
    assert api.token == "hf_test"
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][2]["private"] is True and api.calls[0][2]["exist_ok"] is True
    assert api.calls[1][2]["branch"] == "v1"
    commit = api.calls[2][2]
    assert commit["revision"] == "v1" and commit["token"] == "hf_test"
    assert "ratio 0.5" in commit["commit_message"]
    assert set(api.uploads) == EXPECTED_FILES

    card = ModelCard(api.uploads["README.md"].decode())
    assert 'from_pretrained("me/tiny-rec-odllm")' in card.text
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.3
    assert json.loads(api.uploads["config.json"])["quantization_config"]["quant_method"] == "odllm"
    # the push leaves no card settings behind: a later local save has no model-index
    assert ModelCard.load(compressor.save_pretrained(tmp_path / "later") / "README.md").data.eval_results is None

    # a local directory with the Hub layout loads with the standard API and gives the same outputs
    local = api.materialize(tmp_path / "hub_layout")
    reloaded = AutoModelForCausalLM.from_pretrained(local).eval()
    AutoTokenizer.from_pretrained(local)
    ids = calibration_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, compressor.model.eval()(ids).logits)


def test_push_errors_name_the_fix(tmp_path, api):
    from conftest import tiny_model
    from optimum_odllm import ODLLMCompressor

    with pytest.raises(RuntimeError, match="compress"):
        ODLLMCompressor(tiny_model()).push_to_hub("me/x")
    compressor = compressed(tmp_path)
    with pytest.raises(ValueError, match="repo_id"):
        compressor.push_to_hub("")
    assert api.calls == []


def test_compressed_model_pushes_with_standard_push_to_hub(tmp_path, monkeypatch):
    """``model.push_to_hub`` (transformers) uploads an OD-LLM checkpoint that loads back."""
    import transformers.utils.hub as thub
    from huggingface_hub.errors import EntryNotFoundError
    from transformers import AutoModelForCausalLM

    recorder = RecordingApi()
    monkeypatch.setattr(thub, "hf_api", lambda: recorder)

    def no_remote_card(*args, **kwargs):
        raise EntryNotFoundError("no README on the (mocked) Hub")

    monkeypatch.setattr(thub.ModelCard, "load", no_remote_card)
    compressor = compressed(tmp_path)
    compressor.model.push_to_hub("me/plain-push", private=True)
    assert [c[0] for c in recorder.calls] == ["create_repo", "create_commit"]
    assert {"config.json", "model.safetensors"} <= set(recorder.uploads)
    local = recorder.materialize(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(local).eval()
    ids = calibration_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, compressor.model.eval()(ids).logits)


def test_push_folder_is_one_commit(tmp_path, api):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    hub.push_folder_to_hub(tmp_path, "me/folder")
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert set(api.uploads) == {"a.txt", "sub/b.txt"}
