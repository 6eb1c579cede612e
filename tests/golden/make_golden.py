"""Writes the golden files of ``tests/test_golden.py`` for fixed seeds and settings:

* ``factors_sha256.json``: SHA-256 of every saved factor, with the fingerprint of the machine that computed them
  (``_recorded_on``). Bit-identical factors are only promised where that fingerprint matches: the float32 forward
  passes between layers round differently with other vector instruction sets (ATen's AVX2 vs AVX-512 kernels).
* ``factors_probes.json``: every module's ``up @ down`` sketched by fixed random matrices on both sides
  (``[PROBES, PROBES]``, float64): what the tolerance test compares on any machine.

Run before a refactor of the pipeline (``python tests/golden/make_golden.py tests/golden``); the tests recompute
both and must find the same bytes (same machine) and the same probes within float tolerance (anywhere).
"""
import hashlib
import json
import platform
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
PROBES = 4


def machine_fingerprint() -> dict[str, str]:
    """What decides the bits of the float32 kernels: torch build, ATen's dispatch level, the CPU's vector flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx"))))
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "vector_flags": flags, "threads": str(torch.get_num_threads())}


def compressed_factors(case: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (up, down)}`` of the tiny model compressed with ``case``'s settings."""
    from optimum_odllm import LowRankLinear, ODLLMCompressor, ODLLMConfig

    case = dict(case)
    arch = case.pop("arch", "llama")
    model = tiny_model(arch, num_hidden_layers=3)
    config = ODLLMConfig(rank_multiple=8, calibration_batch_size=4, min_calibration_tokens=16, **case)
    data = None if not (config.whitening or config.progressive) else calibration_ids(16, 24)
    ODLLMCompressor(model, config).compress(data, device="cpu")
    return {name: (module.up.weight.detach(), module.down.weight.detach())
            for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


def factor_hashes(case: dict) -> dict[str, str]:
    out = {}
    for name, factors in compressed_factors(case).items():
        for part, t in zip(("up", "down"), factors):
            out[f"{name}.{part}"] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def product_probes(case: dict) -> dict[str, torch.Tensor]:
    """A two-sided random sketch ``L^T (up @ down) R`` (``[PROBES, PROBES]``, float64; ``L``, ``R`` seeded Gaussian)
    per module: invariant to the sign and rotation freedom of the factors, a few numbers per module, and its
    relative error tracks that of the whole product."""
    out = {}
    for name, (up, down) in compressed_factors(case).items():
        generator = torch.Generator().manual_seed(0)
        left = torch.randn(up.shape[0], PROBES, generator=generator, dtype=torch.float64)
        right = torch.randn(down.shape[1], PROBES, generator=generator, dtype=torch.float64)
        out[name] = (left.T @ up.double()) @ (down.double() @ right)
    return out


if __name__ == "__main__":
    import optimum_odllm

    print("package:", optimum_odllm.__file__, file=sys.stderr)
    directory = Path(sys.argv[1])
    hashes = {"_recorded_on": machine_fingerprint(), **{name: factor_hashes(case) for name, case in CASES.items()}}
    (directory / "factors_sha256.json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    probes = {name: {m: [[float(f"{v:.12g}") for v in row] for row in p.tolist()] for m, p in product_probes(case).items()}
              for name, case in CASES.items()}
    (directory / "factors_probes.json").write_text(json.dumps(probes, sort_keys=True) + "\n")
