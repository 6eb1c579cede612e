"""Model cards: rendered from the packaged template with huggingface_hub, every field present, valid metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hub_helpers import compressed

from optimum_odllm.modelcard import (
    TEMPLATE_PATH,
    build_model_card,
    eval_results_from_metrics,
    rank_summary_markdown,
    update_card_eval_results,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL = {"MovieLens-100K": {"HR@1": 0.05, "HR@5": 0.11, "HR@10": 0.1875, "NDCG@5": 0.08, "NDCG@10": 0.1}}


def test_repository_template_matches_packaged_copy():
    assert (REPO_ROOT / "model_cards" / "odllm_template.md").read_text() == TEMPLATE_PATH.read_text()


def test_saved_card_has_every_field_and_valid_metadata(tmp_path):
    compressor = compressed(tmp_path)
    compressor.calibration_source = "MovieLens-100K training sequences"
    out = compressor.save_pretrained(tmp_path / "out", eval_results=EVAL)

    card = ModelCard.load(out / "README.md", ignore_metadata_errors=False)
    data = card.data
    assert data.license == "mit"  # inherited from the base model's card
    assert data.base_model is None  # local path: not a Hub id, so not claimed as base_model metadata
    assert data.library_name == "transformers" and "odllm" in data.tags
    index = data.to_dict()["model-index"]
    results = index[0]["results"][0]
    assert results["dataset"]["name"] == "MovieLens-100K" and results["dataset"]["split"] == "test"
    metrics = {m["name"]: m["value"] for m in results["metrics"]}
    assert metrics["HR@10"] == 0.1875 and metrics["NDCG@10"] == 0.1 and len(metrics) == 5
    assert {r.metric_type for r in data.eval_results} >= {"hit_rate@10", "ndcg@10"}

    text = card.text
    report = compressor.report
    for needle in (
        "import optimum_odllm", "AutoModelForCausalLM.from_pretrained(", str(Path(compressor.source).name),
        "| Kept ratio (target) | 0.5 |", "| Whitening (token covariance normalization) | yes |",
        "| Progressive layer-wise alignment | yes |", "MovieLens-100K training sequences",
        f"{report.num_calibration_samples} sequences, {report.num_calibration_tokens} tokens",
        "Parameter bytes", "### Per-layer ranks", "`self_attn.q_proj`", "## Limitations", "0.1875",
    ):
        assert needle in text, needle
    entries = report.refinement  # the default refines: the card says what it did, from the report
    assert entries and f"| Block refinement | yes, {len(entries)} layers (" in text
    before = sum(e["held_out_before"] for e in entries) / len(entries)
    assert f"mean over layers, {before:.3g} -> " in text
    q_rank = compressor.config.ranks["model.layers.0.self_attn.q_proj"]
    assert f"| 0 | {q_rank} |" in text
    assert "could not be detected" not in text
    # also present next to the model: the recommender's item index, copied from the base directory
    assert (out / "item_index.json").read_text() == (Path(compressor.source) / "item_index.json").read_text()


def test_model_name_titles_the_card_and_its_model_index(tmp_path):
    compressor = compressed(tmp_path)
    default = ModelCard.load(compressor.save_pretrained(tmp_path / "a", eval_results=EVAL) / "README.md")
    assert default.data.model_name == f"{Path(compressor.source).name}-odllm-0.5"
    named = ModelCard.load(compressor.save_pretrained(tmp_path / "b", eval_results=EVAL, model_name="ml100k-rec") / "README.md")
    assert named.data.model_name == "ml100k-rec" and named.data.to_dict()["model-index"][0]["name"] == "ml100k-rec"
    assert "# ml100k-rec (OD-LLM, ratio 0.5)" in named.text


def test_hub_base_model_and_unknown_license(tmp_path, monkeypatch):
    compressor = compressed(tmp_path, license=None)
    compressor.source = "some-org/tiny-rec"  # as if loaded from the Hub (offline: license unknown)
    card = build_model_card(compressor, repo_id="me/tiny-rec-odllm")
    assert card.data.base_model == "some-org/tiny-rec"
    assert card.data.license is None and "could not be detected" in card.text
    assert 'from_pretrained("me/tiny-rec-odllm")' in card.text
    assert "model-index" not in card.data.to_dict()  # no results given: no empty model-index
    assert "No evaluation results" in card.text
    assert build_model_card(compressor, license="apache-2.0").data.license == "apache-2.0"


def test_update_card_eval_results_merges(tmp_path):
    compressor = compressed(tmp_path)
    out = compressor.save_pretrained(tmp_path / "out")
    update_card_eval_results(out / "README.md", {"ml-100k": {"HR@10": 0.25}})
    card = update_card_eval_results(out / "README.md", {"ml-100k": {"HR@10": 0.5, "NDCG@10": 0.3}})
    values = {(r.dataset_name, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert values == {("ml-100k", "HR@10"): 0.5, ("ml-100k", "NDCG@10"): 0.3}
    assert "| ml-100k (test) | 0.5000 | 0.3000 |" in card.text


def test_eval_results_and_rank_summary_units():
    results = eval_results_from_metrics({"Beauty": {"NDCG@5": 0.2}})
    assert results[0].metric_type == "ndcg@5" and results[0].dataset_type == "beauty"
    with pytest.raises(ValueError, match="non-empty dict"):
        eval_results_from_metrics({"Beauty": {}})
    table = rank_summary_markdown({"model.layers.0.mlp.up_proj": 8, "model.layers.1.mlp.up_proj": 16})
    assert "| `mlp.up_proj` | 8 | 12 | 16 | - |" in table
    assert rank_summary_markdown({}) == "No module was factorized."


def test_card_needs_compression(tmp_path):
    from conftest import tiny_model
    from optimum_odllm import ODLLMCompressor

    with pytest.raises(RuntimeError, match="compress"):
        build_model_card(ODLLMCompressor(tiny_model()))
