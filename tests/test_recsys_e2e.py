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
    for name in ("popularity", "dense", "odllm@0.5", "odllm-no-whitening@0.5", "odllm-no-progressive@0.5", "svd@0.5"):
        assert METRICS <= set(results[name]), name
        assert all(0.0 <= results[name][m] <= 1.0 for m in METRICS)
    assert results["odllm@0.5"]["params"] < results["dense"]["params"]
    assert results["svd@0.5"]["params"] == results["odllm@0.5"]["params"]  # same size, different method
    assert (tmp_path / "results.md").read_text().count("|") > 20
    assert (tmp_path / "quality_vs_ratio.png").stat().st_size > 1000
    assert (tmp_path / "odllm-0.5" / "item_index.json").is_file()

    # the saved OD-LLM checkpoint reloads through AutoModelForCausalLM and reproduces its metrics
    import optimum_odllm  # noqa: F401  (registers the odllm quantization method)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_odllm.recsys import (PACKED_SEQREC_TEMPLATE, InstructionEncoder, ItemIndex, evaluate_recommender,
                                      leave_one_out, load_movielens_100k)

    ckpt = tmp_path / "odllm-0.5"
    data = load_movielens_100k()
    test = leave_one_out(data.sequences).test[: results["eval_users"]]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    encoder = InstructionEncoder(AutoTokenizer.from_pretrained(ckpt), ItemIndex.load(ckpt), data.item_text)
    again = evaluate_recommender(model, encoder, test, PACKED_SEQREC_TEMPLATE, num_beams=20, progress=False)
    for m in METRICS:
        assert again[m] == pytest.approx(results["odllm@0.5"][m], abs=1e-9), m
