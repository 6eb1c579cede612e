"""Property-based tests (hypothesis): config validation and the loaders never fail with anything but a clear ValueError."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimum_odllm import ODLLMConfig
from optimum_odllm.calibration import CalibrationSet, prepare_calibration
from optimum_odllm.recsys.artifacts import validate_item_index_file
from optimum_odllm.checkpointing import CheckpointError, LayerCheckpointer
from optimum_odllm.ranks import ModuleShape, allocate_ranks

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)

FIELDS = {
    "ratio": st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 3),
    "whitening": st.booleans(),
    "progressive": st.booleans(),
    "target_modules": st.none() | st.lists(st.text(max_size=6), max_size=3) | st.text(max_size=6),
    "modules_to_not_convert": st.none() | st.lists(st.text(max_size=6), max_size=3),
    "rank_multiple": st.integers(-4, 256),
    "num_calibration_samples": st.integers(-4, 512),
    "calibration_seq_len": st.integers(-4, 4096),
    "min_calibration_tokens": st.integers(-4, 4096),
    "calibration_batch_size": st.integers(-4, 64),
    "covariance_dtype": st.sampled_from(["float64", "float32", "float16", "double"]),
    "solver_dtype": st.sampled_from(["float64", "float32", "bfloat16"]),
    "svd_driver": st.sampled_from([None, "gesvd", "gesvdj", "gesvda", "lapack"]),
    "ranks": st.none() | st.dictionaries(st.text(min_size=1, max_size=6), st.integers(-2, 64), max_size=3),
}


@FAST
@given(
    st.dictionaries(st.sampled_from(sorted(FIELDS)), anything, max_size=4),
    st.fixed_dictionaries({}, optional=FIELDS),
)
def test_config_validation_accepts_exactly_the_valid_settings(junk, plausible):
    for kwargs in (junk, plausible):
        try:
            config = ODLLMConfig(**kwargs)
        except ValueError as err:
            assert str(err)  # a message, never another exception type
            continue
        # Invariants of every accepted config (an independent statement of the rules).
        assert isinstance(config.ratio, (int, float)) and not isinstance(config.ratio, bool)
        assert 0 < config.ratio <= 1 and not math.isnan(config.ratio)
        for name in ("rank_multiple", "num_calibration_samples", "calibration_seq_len", "calibration_batch_size"):
            value = getattr(config, name)
            assert isinstance(value, int) and not isinstance(value, bool) and value >= 1
        assert config.covariance_dtype in ("float64", "float32") and config.solver_dtype in ("float64", "float32")
        assert config.svd_driver in (None, "gesvd", "gesvdj", "gesvda")
        for name in ("target_modules", "modules_to_not_convert"):
            value = getattr(config, name)
            assert value is None or (isinstance(value, list) and all(isinstance(v, str) and v for v in value))
        assert all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in config.ranks.values())
        # round trip through config.json
        again = ODLLMConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again.to_dict() == config.to_dict()


token_lists = st.lists(
    st.lists(st.integers(-5, 400) | st.sampled_from([1.5, True, None, "7", 2**64]), max_size=12), max_size=6
)
tensors = st.builds(
    lambda shape, dtype, high: torch.randint(-2, high, shape).to(dtype),
    st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    st.sampled_from([torch.int64, torch.int32, torch.int16, torch.float32, torch.bool]),
    st.integers(1, 400),
)
mappings = st.builds(
    lambda ids, mask: {"input_ids": ids, "attention_mask": mask} if mask is not None else {"input_ids": ids},
    token_lists | tensors,
    st.none() | token_lists | tensors,
)
near_valid = st.lists(st.lists(st.integers(0, 305), min_size=1, max_size=10), min_size=1, max_size=6)
calibration_data = (
    near_valid
    | st.builds(lambda rows: {"input_ids": rows, "attention_mask": [[1] * (len(r) - 1) + [0] for r in rows]}, near_valid)
    | token_lists | tensors | mappings | st.lists(st.text(max_size=10), max_size=4) | anything
    | st.lists(mappings, max_size=3)
    | st.lists(st.builds(lambda r: {"input_ids": r, "attention_mask": [1] * len(r)}, st.lists(st.integers(0, 305), max_size=8)), max_size=4)
)


@FAST
@given(calibration_data, st.integers(1, 40), st.sampled_from([None, 0, 5]))
def test_calibration_loader_rejects_malformed_data_with_value_error(data, min_tokens, pad):
    vocab = 300
    try:
        batch = prepare_calibration(
            data, num_samples=4, max_length=8, min_tokens=min_tokens, vocab_size=vocab, pad_token_id=pad
        )
    except ValueError as err:
        assert str(err)
        return
    assert isinstance(batch, CalibrationSet)
    ids, mask = batch.input_ids, batch.attention_mask
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape == mask.shape
    assert ids.shape[0] <= 4 and ids.shape[1] <= 8
    assert int(ids.min()) >= 0 and int(ids.max()) < vocab
    assert set(mask.unique().tolist()) <= {0, 1}
    assert batch.num_tokens >= max(1, min_tokens)
    if pad is not None:
        assert not bool((mask.bool() & (ids == pad)).any())  # a known pad id never counts as a real token


index_documents = st.one_of(
    anything,
    st.fixed_dictionaries(
        {"codes": st.lists(st.lists(st.integers(-1, 5) | anything, max_size=4) | anything, max_size=5)},
        optional={"item_ids": anything | st.lists(st.text(max_size=3), max_size=5), "levels": anything},
    ),
)


def write_document(path: Path, document) -> None:
    """Raw bytes as they are, anything else as JSON (unserializable values as strings)."""
    if isinstance(document, bytes):
        path.write_bytes(document)
    else:
        path.write_text(json.dumps(document, default=str))


@FAST
@given(index_documents | st.binary(max_size=40))
def test_item_index_loader_rejects_malformed_files_with_value_error(document):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "item_index.json")
        write_document(path, document)
        try:
            index = validate_item_index_file(path)
        except ValueError as err:
            assert "item_index.json" in str(err)  # names the file
            return
        assert len(set(index.codes)) == len(index.codes)
        assert all(isinstance(v, int) and v >= 0 for code in index.codes for v in code)


@FAST
@given(anything | st.fixed_dictionaries({"format": st.just(1), "fingerprint": st.just({"a": "1"})}, optional={
    "layers": anything, "completed_layers": anything, "state_file": anything,
}) | st.binary(max_size=40))
def test_checkpoint_manifest_loader_rejects_malformed_manifests(document):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "manifest.json")
        write_document(path, document)
        with pytest.raises(CheckpointError, match="resume=False"):
            LayerCheckpointer(tmp, {"a": "1"}).load(num_batches=1)


@FAST
@given(
    # widths >= 3: allocate_ranks gives rank 1 to 1xN / 2x2 weights that cannot be factorized profitably
    # (e.g. dims=[(1, 1), (2, 7)], ratio=0.75); the compressor keeps such modules dense (tested below).
    st.lists(st.tuples(st.integers(3, 300), st.integers(3, 300)), min_size=1, max_size=6),
    st.floats(0.05, 1.0),
    st.sampled_from([1, 8, 128]),
)
def test_allocated_ranks_always_save_parameters_and_respect_the_budget(dims, ratio, multiple):
    shapes = [ModuleShape(f"m{i}", a, b) for i, (a, b) in enumerate(dims)]
    try:
        ranks = allocate_ranks(shapes, ratio, multiple)
    except ValueError as err:
        assert "too small" in str(err)
        return
    kept = 0
    for shape in shapes:
        rank = ranks[shape.name]
        if rank is None:
            kept += shape.dense_params
        else:
            assert 1 <= rank and rank * (shape.in_features + shape.out_features) < shape.dense_params
            kept += rank * (shape.in_features + shape.out_features)
    assert kept <= ratio * sum(s.dense_params for s in shapes)
    if ratio == 1.0:
        assert all(r is None for r in ranks.values())
