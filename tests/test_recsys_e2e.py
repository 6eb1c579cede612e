"""Tiny end-to-end run of examples/ml100k_end_to_end.py --quick (train, evaluate, compress, report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"}


@pytest.mark.slow
def test_ml100k_quick_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "examples" / "ml100k_end_to_end.py"), "--output-dir", str(tmp_path),
                    "--quick"], check=True, env=env, timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["dataset"], results["users"], results["items"]) == ("ml-100k", 943, 1682)
    for name in ("popularity", "popularity-unseen", "dense", "odllm@0.5", "odllm-closed-form@0.5",
                 "odllm-no-whitening@0.5", "odllm-no-progressive@0.5", "svd@0.5"):
        for r in (results[name], results[name].get("unmasked", results[name])):
            assert METRICS <= set(r), name
            assert all(0.0 <= r[m] <= 1.0 and 0.0 <= r[m + "_se"] <= 0.5 for m in METRICS), name
    table = (tmp_path / "results.md").read_text()
    assert "HR@10 unmasked" in table and table.count("±") == 7 * 7  # popularity, dense, 5 variants x (5 masked + 2 unmasked)
    assert results["odllm@0.5"]["params"] < results["dense"]["params"]
    assert results["svd@0.5"]["params"] == results["odllm@0.5"]["params"]  # same size, different method
    assert (tmp_path / "results.md").read_text().count("|") > 20
    assert (tmp_path / "quality_vs_ratio.png").stat().st_size > 1000
    assert (tmp_path / "odllm-0.5" / "item_index.json").is_file()
    # its model card publishes the masked test metrics of the table and says what the calibration data was
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "odllm-0.5" / "README.md")
    published = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert published == {m: results["odllm@0.5"][m] for m in METRICS} and card.data.model_name == "ml-100k-lcrec-odllm-0.5"
    assert "ml-100k training sequences (64 packed histories" in card.text and str(tmp_path / "dense") in card.text

    # the saved OD-LLM checkpoint reloads through AutoModelForCausalLM and reproduces its metrics
    import optimum_odllm  # noqa: F401  (registers the odllm quantization method)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_odllm.recsys import (PACKED_SEQREC_TEMPLATE, InstructionEncoder, ItemIndex, evaluate_recommender,
                                      leave_one_out, load_movielens_100k, recommend)
    from optimum_odllm.recsys.history import seen_items

    ckpt = tmp_path / "odllm-0.5"
    data = load_movielens_100k()
    split = leave_one_out(data.sequences)
    test = split.test[: results["eval_users"]]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    encoder = InstructionEncoder(AutoTokenizer.from_pretrained(ckpt), ItemIndex.load(ckpt), data.item_text)
    for mask, expected in ((True, results["odllm@0.5"]), (False, results["odllm@0.5"]["unmasked"])):
        again = evaluate_recommender(model, encoder, test, PACKED_SEQREC_TEMPLATE, num_beams=20, progress=False,
                                     train=split.train, exclude_history=mask)
        for m in METRICS:
            assert again[m] == pytest.approx(expected[m], abs=1e-9), (mask, m)
    # on the real model too: masked lists are full-length and hold no seen item
    seen = seen_items(split.train, test[:16])
    ranked = recommend(model, encoder, test[:16], PACKED_SEQREC_TEMPLATE, num_beams=20, progress=False, exclude=seen)
    assert all(len(set(r)) == 20 and not set(r) & s for r, s in zip(ranked, seen))


def _load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ml100k_end_to_end", ROOT / "examples" / "ml100k_end_to_end.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_refuses_to_start_without_matplotlib(monkeypatch, tmp_path):
    """Without the plotting extra the job must fail at once, naming the fix, not after minutes of training."""
    example = _load_example()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)

    def no_work(*args, **kwargs):
        raise AssertionError("data loading started before the dependency check")

    monkeypatch.setattr(example, "load_movielens_100k", no_work)
    with pytest.raises(ImportError, match=r"pip install 'optimum-odllm\[recsys\]'") as info:
        example.main(["--output-dir", str(tmp_path), "--quick"])
    assert "matplotlib" in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing written either
    monkeypatch.undo()
    example.check_optional_dependencies()  # with matplotlib importable the check passes
