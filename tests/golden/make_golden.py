"""Writes tests/golden/factors_sha256.json: SHA-256 of every saved factor for fixed seeds and settings.

Run once before a refactor of the pipeline (``python tests/golden/make_golden.py OUT.json``); the test
``test_golden_factors_are_bit_identical`` recomputes the hashes and must find the same bytes.
"""
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import calibration_ids, tiny_model  # noqa: E402

#: closed-form pipeline only (refine_steps=0): Adam steps are not promised bit-identical across machines
CASES = {
    "progressive": dict(ratio=0.5, refine_steps=0),
    "no_progressive": dict(ratio=0.5, progressive=False, refine_steps=0),
    "no_whitening": dict(ratio=0.4, whitening=False, refine_steps=0),
    "plain_svd": dict(ratio=0.3, whitening=False, progressive=False, refine_steps=0),
    "qwen2_progressive": dict(ratio=0.3, arch="qwen2", refine_steps=0),
}


def factor_hashes(case: dict) -> dict[str, str]:
    from optimum_odllm import LowRankLinear, ODLLMCompressor, ODLLMConfig

    case = dict(case)
    arch = case.pop("arch", "llama")
    model = tiny_model(arch, num_hidden_layers=3)
    config = ODLLMConfig(rank_multiple=8, calibration_batch_size=4, min_calibration_tokens=16, **case)
    data = None if not (config.whitening or config.progressive) else calibration_ids(16, 24)
    ODLLMCompressor(model, config).compress(data, device="cpu")
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            for part in ("down", "up"):
                t = getattr(module, part).weight.detach().contiguous()
                out[f"{name}.{part}"] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


if __name__ == "__main__":
    import optimum_odllm

    print("package:", optimum_odllm.__file__, file=sys.stderr)
    result = {name: factor_hashes(case) for name, case in CASES.items()}
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
