"""The sequential pipeline: one decoder layer at a time, as in GPTQ (memory holds one layer's activations).

For each layer: **statistics** (forward the stored inputs with hooks that accumulate ``X^T X`` per
input group and, with progressive alignment, ``X^T X_ref`` against the original model's inputs),
**solve** (:func:`optimum_odllm.solvers.solve_module`, a pure function), **write back**
(:mod:`optimum_odllm.factor_storage`: float ``LowRankLinear`` factors, or with ``factor_bits`` integer factors
quantized against the covariance just collected), **refine** (:mod:`optimum_odllm.refinement`: a few Adam
steps on the layer's float factors toward the dense layer's outputs, before any integer rounding), **propagate**
(push the drifted stream through the compressed, possibly quantized, layer, so the next layer's statistics
see the rounding too) and **checkpoint** (:mod:`optimum_odllm.checkpointing`). The stages are timed into
the report.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn
from transformers.utils import logging

from .calibration import CalibrationSet
from .checkpointing import LayerCheckpointer
from .layerwise import ActivationHooks, LayerInputs, capture_first_layer_inputs, run_layer
from .linalg import check_finite
from .factor_storage import FactorStorage, FloatFactors, factor_storage
from .ranks import ModuleShape, allocate_ranks
from .refinement import RefinementBatch, refine_block, resolve_refine_steps
from .result import CompressionReport, ModuleReport
from .solvers import SolveProblem, solve_data_free, solve_module, solver_dtype
from .targets import find_decoder_layers, linear_shape, linear_weight


logger = logging.get_logger(__name__)

_COV_DTYPES = {"float64": torch.float64, "float32": torch.float32}
INT4_MIN_KERNEL_GROUP = 32  # the narrowest int4 group the CPU integer kernel takes


class StageTimer:
    """Accumulates wall time per stage name (synchronizing CUDA so GPU work is counted)."""

    def __init__(self, totals: dict[str, float], device: torch.device):
        self.totals = totals
        self.cuda = device.type == "cuda"

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - start


def plan_ranks(shapes: list[ModuleShape], config: Any) -> dict[str, int | None]:
    """Rank per module under the parameter budget; ``None`` where a factorization would not be smaller.

    With int4 factors the alignment step is a multiple of ``factor_group_size`` (halved for modules too small
    for it, never below 32 columns where the module holds a rank of 32): a rank that is not a multiple of the
    group shrinks the ``up`` factor's int4 groups (rank 104 with ``rank_multiple=8`` -> groups of 8 columns,
    8 bits per weight with their scales and zeros, and no integer kernel below 32).
    """
    multiple, floor = config.rank_multiple, 1
    if getattr(config, "factor_bits", None) == 4 and getattr(config, "factor_group_size", None):
        multiple = math.lcm(max(1, multiple), config.factor_group_size)
        floor = min(INT4_MIN_KERNEL_GROUP, config.factor_group_size)
    ranks = allocate_ranks(shapes, config.ratio, multiple, min_multiple=floor)
    for shape in shapes:
        rank = ranks[shape.name]
        if rank is not None and shape.lowrank_params(rank) >= shape.dense_params:
            ranks[shape.name] = None
    return ranks


@dataclass
class SolvedModule:
    """One module of the current layer after its closed-form solve (solver dtype): what the integer write-back
    after refinement needs, including the closed-form factors for when refinement keeps them (``None`` where no
    such write-back follows, so the closed-form path holds no extra copy of a layer's factors)."""

    covariance: torch.Tensor
    report: ModuleReport
    up: torch.Tensor | None
    down: torch.Tensor | None


def _solve_and_install(
    model: nn.Module, name: str, module: nn.Module, rank: int, covariance: torch.Tensor,
    cross: torch.Tensor | None, config: Any, storage: FactorStorage, timer: StageTimer, keep_factors: bool = False,
) -> SolvedModule:
    """Solve one module in closed form and write its factors back through ``storage``."""
    dtype = solver_dtype(config)
    problem = SolveProblem(
        name=name,
        weight=linear_weight(module).detach().to(device=covariance.device, dtype=dtype),
        covariance=covariance.to(dtype),
        cross=None if cross is None else cross.to(dtype),
        rank=rank,
    )
    with timer("solve"):
        solution = solve_module(problem, config)
    report = ModuleReport.solved(name, linear_shape(module), rank, solution.factors.singular_values, solution.jitter)
    with timer(storage.stage):
        storage.install(model, name, solution.factors.up, solution.factors.down, problem.covariance, report)
    kept = (solution.factors.up, solution.factors.down) if keep_factors else (None, None)
    return SolvedModule(problem.covariance, report, *kept)


def compress_data_free(
    model: nn.Module, targets: dict[str, nn.Module], ranks: dict[str, int | None], config: Any,
    report: CompressionReport, timer: StageTimer,
) -> None:
    """``whitening=False, progressive=False`` without data: plain truncated SVD of every weight."""
    if config.factor_bits is not None and config.factor_quantizer == "gptq":
        raise ValueError(
            "factor_quantizer='gptq' weighs the rounding error by the input covariance, which needs calibration "
            "data: pass calibration data, or use factor_quantizer='rtn' for data-free plain rounding."
        )
    resolve_refine_steps(config.refine_steps, calibrated=False)  # an explicit refine_steps > 0 is refused here
    dtype, storage = solver_dtype(config), factor_storage(config)
    for name, module in logging.tqdm(list(targets.items()), desc="OD-LLM plain SVD"):
        rank = ranks[name]
        if rank is None:
            report.modules.append(ModuleReport(name, *linear_shape(module), None))
            continue
        weight = linear_weight(module).detach().to(dtype)
        with timer("solve"):
            solution = solve_data_free(SolveProblem(name, weight, weight, None, rank), config)
        entry = ModuleReport.solved(name, linear_shape(module), rank, solution.factors.singular_values, 0.0)
        with timer(storage.stage):
            storage.install(model, name, solution.factors.up, solution.factors.down, None, entry)
        report.modules.append(entry)


def _resume(
    model: nn.Module, checkpointer: LayerCheckpointer, num_batches: int, targets: dict[str, nn.Module],
    ranks: dict[str, int | None], layers_name: str, num_layers: int, report: CompressionReport, storage: FactorStorage,
) -> tuple[int, list[torch.Tensor], list[torch.Tensor] | None]:
    """Restore finished layers from the checkpoint; returns the next layer and the two hidden-state streams."""
    state = checkpointer.load(num_batches)
    if state.completed_layers > num_layers:
        raise checkpointer.fail(f"it has {state.completed_layers} layers but the model has {num_layers}")
    done = tuple(f"{layers_name}.{i}." for i in range(state.completed_layers))
    expected = {
        name: storage.expected_shapes(module, ranks[name])
        for name, module in targets.items() if name.startswith(done) and ranks[name] is not None
    }
    start = checkpointer.restore(
        state, expected, lambda name, tensors: storage.restore(model, name, ranks[name], tensors)
    )
    report.modules.extend(ModuleReport(**entry) for entry in state.modules)
    report.refinement.extend(state.refinement)
    logger.warning(
        f"OD-LLM: resuming from the checkpoint in {checkpointer.directory}: layers 0..{start - 1} "
        f"are restored, continuing with layer {start} of {num_layers}."
    )
    return start, state.reference, state.drifted


def _refine_then_store(
    model: nn.Module, layer: nn.Module, index: int, solved: dict[str, SolvedModule],
    layer_inputs: list[torch.Tensor], reference: LayerInputs, steps: int, storage: FactorStorage, config: Any,
    report: CompressionReport, device: torch.device, timer: StageTimer,
) -> None:
    """Block refinement of this layer's float factors toward the dense layer's outputs
    (:mod:`optimum_odllm.refinement`), then the write-back ``storage`` asks for (e.g. integer codes)."""
    factors = [p for name in solved for p in (model.get_submodule(name).down.weight, model.get_submodule(name).up.weight)]
    batches = [RefinementBatch(x, kwargs, mask, target) for x, (target, kwargs, mask) in zip(layer_inputs, reference)]
    with timer("refine"):
        outcome = refine_block(layer, factors, batches, steps, config.refine_lr, device, f"layer {index}")
    report.refinement.append({"layer": index, **asdict(outcome)})
    logger.info(
        f"OD-LLM refinement, layer {index}: held-out block error {outcome.held_out_before:.4g} -> "
        f"{outcome.held_out_after:.4g} (kept the factors of step {outcome.steps})"
    )
    if isinstance(storage, FloatFactors):
        return
    dtype = solver_dtype(config)
    with timer(storage.stage):
        for name, done in solved.items():
            # no gain: round the closed-form factors themselves, exactly as with refine_steps=0
            up, down = (done.up, done.down) if outcome.steps == 0 else (
                model.get_submodule(name).up.weight.detach().to(dtype), model.get_submodule(name).down.weight.detach().to(dtype))
            storage.install(model, name, up, down, done.covariance, done.report)


#: dense parameters per decoder layer above which block refinement on a CPU gets a warning (a Qwen2.5-0.5B layer,
#: ~15M, takes ~1 s per step on 2 cores: docs/alignment.md)
CPU_REFINE_WARN_PARAMS = 5_000_000


def _warn_if_refinement_is_slow_here(
    refine_steps: int, targets: dict[str, nn.Module], layers_name: str, num_layers: int, device: torch.device
) -> None:
    if not refine_steps or device.type != "cpu":
        return
    largest = max(
        sum(math.prod(linear_shape(m)) for n, m in targets.items() if n.startswith(f"{layers_name}.{i}."))
        for i in range(num_layers)
    )
    if largest > CPU_REFINE_WARN_PARAMS:
        logger.warning(
            f"OD-LLM: block refinement ({refine_steps} steps per layer) runs on the CPU with layers of up to "
            f"{largest:,} parameters; this can take minutes per layer. Compress on a GPU "
            "(device='cuda'), or pass refine_steps=0 (--refine-steps 0) for the closed form."
        )


def compress_layerwise(
    model: nn.Module, targets: dict[str, nn.Module], ranks: dict[str, int | None], calibration: CalibrationSet,
    config: Any, report: CompressionReport, device: torch.device, timer: StageTimer,
    checkpointer: LayerCheckpointer | None = None, resume: bool = False,
) -> None:
    """Compress every decoder layer in order, feeding each the outputs of the already-compressed prefix."""
    layers_name, layers = find_decoder_layers(model, config.block_name_to_compress)
    batches = list(calibration.batches(config.calibration_batch_size))
    with timer("capture"), torch.no_grad():
        reference = capture_first_layer_inputs(model, layers[0], batches, device)
    drifted: LayerInputs | None = None  # inputs seen through the compressed prefix (progressive only)
    cov_dtype = _COV_DTYPES[config.covariance_dtype]
    storage = factor_storage(config)
    refine_steps = resolve_refine_steps(config.refine_steps, calibrated=True)
    _warn_if_refinement_is_slow_here(refine_steps, targets, layers_name, len(layers), device)
    # with refinement the solve writes float factors, refined before `storage` (e.g. integer codes) takes them
    solve_storage = FloatFactors() if refine_steps else storage
    round_after_refining = solve_storage is not storage
    start = 0
    if checkpointer is not None and resume and checkpointer.exists():
        start, ref_hidden, drift_hidden = _resume(
            model, checkpointer, len(batches), targets, ranks, layers_name, len(layers), report, storage
        )
        reference = reference.with_hidden([h.to(device) for h in ref_hidden])
        if drift_hidden is not None:
            drifted = reference.with_hidden([h.to(device) for h in drift_hidden])

    for index in logging.tqdm(range(start, len(layers)), desc="OD-LLM layers", initial=start, total=len(layers)):
        layer = layers[index]
        prefix = f"{layers_name}.{index}."
        layer_targets = {n: m for n, m in targets.items() if n.startswith(prefix)}
        home = next(layer.parameters()).device
        layer.to(device)
        with torch.no_grad():
            hooks = ActivationHooks({n[len(prefix):]: m for n, m in layer_targets.items()}, cov_dtype, prefix)
            aligned = config.progressive and drifted is not None
            if config.progressive and drifted is None:
                # Both streams are identical until the first compressed layer: share the tensors.
                drifted = reference.with_hidden(list(reference.hidden))
            # what this layer receives (the stats loop below overwrites `reference.hidden` with its outputs); with
            # progressive=False this keeps a third stream alive while the layer is refined
            layer_inputs = list((drifted or reference).hidden) if refine_steps else None
            with timer("statistics"):
                # Outputs overwrite the inputs batch by batch, so only two streams (reference and
                # drifted) are ever held: the memory bound of a 7B run on one GPU.
                for b, (hidden, kwargs, mask) in enumerate(reference):
                    output = hooks.forward("record" if aligned else "accumulate", layer, hidden, kwargs, mask, device)
                    if aligned:
                        hooks.forward("accumulate", layer, drifted.hidden[b], kwargs, mask, device)
                        hooks.clear_recorded()
                    reference.hidden[b] = output
            hooks.remove()
            solved: dict[str, SolvedModule] = {}
            for local_name, group in hooks.stats.group_of.items():
                name = prefix + local_name
                module = layer_targets[name]
                if ranks[name] is None:
                    report.modules.append(ModuleReport(name, *linear_shape(module), None))
                    continue
                cross = hooks.stats.cross_covariance.get(group) if aligned else None
                solved[name] = _solve_and_install(
                    model, name, module, ranks[name], hooks.stats.covariance[group], cross, config, solve_storage, timer,
                    keep_factors=round_after_refining,
                )
                report.modules.append(solved[name].report)
            missing = set(n[len(prefix):] for n in layer_targets) - set(hooks.stats.group_of)
            if missing:
                raise RuntimeError(f"Modules {sorted(missing)} of layer {index} were never called during calibration.")
            if layer_inputs is not None and solved:  # a layer whose modules all stay dense has nothing to refine
                _refine_then_store(model, layer, index, solved, layer_inputs, reference, refine_steps, storage, config,
                                   report, device, timer)
                layer_inputs = None  # let the drifted inputs go once propagate replaces them
            with timer("propagate"):
                if config.progressive:
                    for b, (hidden, kwargs, _) in enumerate(drifted):
                        drifted.hidden[b] = run_layer(layer, hidden, kwargs, device)
                        check_finite(drifted.hidden[b], f"output hidden states of the compressed layer {layers_name}.{index}")
        layer.to(home)
        if checkpointer is not None:
            with timer("checkpoint"):
                factors = {}
                for name in layer_targets:
                    module = model.get_submodule(name)
                    if ranks[name] is not None:
                        factors.update({f"{name}.{k}": v for k, v in storage.checkpoint_tensors(module).items()})
                done = [asdict(m) for m in report.modules if m.name.startswith(prefix)]
                refined = next((e for e in report.refinement if e["layer"] == index), None)
                checkpointer.save_layer(index, factors, done, reference.hidden, drifted.hidden if drifted is not None else None,
                                        refined)
