"""Interruption: per-layer checkpoints, resume after a SIGKILL with a bit-identical result, atomic saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import calibration_ids, tiny_model
from optimum_odllm import ODLLMCompressor, ODLLMConfig
from optimum_odllm import checkpointing
from optimum_odllm.checkpointing import CHECKPOINT_DIRNAME, CheckpointError

TESTS_DIR = Path(__file__).resolve().parent
NUM_LAYERS = 4


def make_config(**overrides) -> ODLLMConfig:
    # refine_steps pinned: the SIGKILL test's child process does not see conftest's shortened default
    settings = dict(ratio=0.5, rank_multiple=8, calibration_batch_size=4, refine_steps=8)
    settings.update(overrides)
    return ODLLMConfig(**settings)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every saved tensor bit-identical, and the same per-module report."""
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert torch.equal(ta[key], tb[key]), key
    ra, rb = (json.loads((d / "odllm_report.json").read_text()) for d in (a, b))
    assert ra["modules"] == rb["modules"]
    assert ra["refinement"] == rb["refinement"]  # the refined layers' report survives the resume too
    assert json.loads((a / "config.json").read_text())["quantization_config"]["ranks"] == json.loads(
        (b / "config.json").read_text()
    )["quantization_config"]["ranks"]


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, layer: int) -> None:
    """Make the checkpointer raise right after it has saved ``layer`` (an in-process 'crash')."""
    original = checkpointing.LayerCheckpointer.save_layer

    def save_layer(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == layer:
            raise Interrupt

    monkeypatch.setattr(checkpointing.LayerCheckpointer, "save_layer", save_layer)


def interrupted_checkpoint(monkeypatch, ids, ckpt, layer: int) -> None:
    """Run a compression that 'crashes' right after checkpointing ``layer``."""
    with monkeypatch.context() as patch:
        interrupt_after(patch, layer=layer)
        with pytest.raises(Interrupt):
            ODLLMCompressor(tiny_model(num_hidden_layers=NUM_LAYERS), make_config()).compress(
                ids, checkpoint_dir=ckpt, resume=True
            )


@pytest.mark.parametrize("progressive, stop", [(True, 1), (False, 1), (True, NUM_LAYERS - 1)])
def test_resume_after_interruption_is_bit_identical(tmp_path, monkeypatch, caplog, progressive, stop):
    ids = calibration_ids(12, 16)
    reference = tmp_path / "reference"
    ODLLMCompressor(tiny_model(num_hidden_layers=NUM_LAYERS), make_config(progressive=progressive)).quantize(
        reference, calibration_dataset=ids
    )
    assert not (reference / CHECKPOINT_DIRNAME).exists()

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after(patch, layer=stop)
        with pytest.raises(Interrupt):
            ODLLMCompressor(tiny_model(num_hidden_layers=NUM_LAYERS), make_config(progressive=progressive)).quantize(
                out, calibration_dataset=ids
            )
    manifest = json.loads((out / CHECKPOINT_DIRNAME / "manifest.json").read_text())
    assert manifest["completed_layers"] == stop + 1
    assert not (out / "config.json").exists()  # nothing loadable was written

    # The resumed run must not redo the checkpointed layers.
    solved: list[str] = []
    from optimum_odllm import pipeline

    original = pipeline.solve_module
    monkeypatch.setattr(pipeline, "solve_module", lambda problem, config: (solved.append(problem.name), original(problem, config))[1])
    with caplog.at_level("WARNING"):
        ODLLMCompressor(tiny_model(num_hidden_layers=NUM_LAYERS), make_config(progressive=progressive)).quantize(
            out, calibration_dataset=ids
        )
    assert f"continuing with layer {stop + 1}" in caplog.text
    redone = {int(name.split(".")[2]) for name in solved}
    assert redone == set(range(stop + 1, NUM_LAYERS))
    assert_same_checkpoint(reference, out)
    assert not (out / CHECKPOINT_DIRNAME).exists()  # deleted after the successful save


def test_resume_refuses_checkpoint_of_other_settings_data_or_model(tmp_path, monkeypatch):
    ids = calibration_ids(12, 16)
    ckpt = tmp_path / "ckpt"
    interrupted_checkpoint(monkeypatch, ids, ckpt, layer=0)
    cases = [
        (tiny_model(num_hidden_layers=NUM_LAYERS), make_config(ratio=0.4), ids, "settings"),
        (tiny_model(num_hidden_layers=NUM_LAYERS), make_config(), calibration_ids(12, 16, seed=7), "calibration"),
        (tiny_model(num_hidden_layers=NUM_LAYERS, seed=5), make_config(), ids, "model"),
    ]
    for model, config, data, what in cases:
        with pytest.raises(CheckpointError, match=rf"different {what}.*resume=False"):
            ODLLMCompressor(model, config).compress(data, checkpoint_dir=ckpt, resume=True)
    # resume=False discards the stale checkpoint and starts over
    model = tiny_model(num_hidden_layers=NUM_LAYERS)
    ODLLMCompressor(model, make_config(ratio=0.4)).compress(ids, checkpoint_dir=ckpt, resume=False)
    assert json.loads((ckpt / "manifest.json").read_text())["completed_layers"] == NUM_LAYERS


def test_resume_requires_checkpoint_dir(calib):
    with pytest.raises(ValueError, match="checkpoint_dir"):
        ODLLMCompressor(tiny_model(), make_config()).compress(calib, resume=True)


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads({threads})
    from conftest import calibration_ids, tiny_model
    from optimum_odllm import ODLLMCompressor, ODLLMConfig, checkpointing

    mode = sys.argv[2]
    if mode == "hang":  # wait (to be SIGKILLed by the parent) once layer 1 is checkpointed
        original = checkpointing.LayerCheckpointer.save_layer
        def save_layer(self, index, *args, **kwargs):
            original(self, index, *args, **kwargs)
            if index == 1:
                time.sleep(120)
        checkpointing.LayerCheckpointer.save_layer = save_layer
    elif mode == "die-while-writing":  # SIGKILL ourselves halfway through writing layer 2's hidden states
        original_save = checkpointing.save_file
        calls = []
        def save_file(tensors, path, metadata=None):
            if "reference.0" in tensors:
                calls.append(path)
                if len(calls) == 3:  # state files are written for layers 0, 1, 2, ...
                    with open(path, "wb") as handle:
                        handle.write(b"\\x00" * 100)  # a torn write
                        handle.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return original_save(tensors, path, metadata=metadata)
        checkpointing.save_file = save_file
    model = tiny_model(num_hidden_layers={layers})
    config = ODLLMConfig(ratio=0.5, rank_multiple=8, calibration_batch_size=4, refine_steps=8)  # as make_config
    ODLLMCompressor(model, config).quantize(sys.argv[1], calibration_dataset=calibration_ids(12, 16))
    print("finished", flush=True)
    """
)


def run_child(script: Path, out: Path, mode: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning")
    return subprocess.Popen(
        [sys.executable, str(script), str(out), mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **popen,
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_identical_model(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS_DIR), threads=torch.get_num_threads(), layers=NUM_LAYERS))
    reference = tmp_path / "reference"
    ODLLMCompressor(tiny_model(num_hidden_layers=NUM_LAYERS), make_config()).quantize(
        reference, calibration_dataset=calibration_ids(12, 16)
    )

    for mode in ("hang", "die-while-writing"):
        out = tmp_path / mode
        manifest = out / CHECKPOINT_DIRNAME / "manifest.json"
        child = run_child(script, out, mode)
        deadline = time.monotonic() + 120
        if mode == "hang":
            while time.monotonic() < deadline and child.poll() is None:
                if manifest.exists() and json.loads(manifest.read_text())["completed_layers"] >= 2:
                    child.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.05)
        _, err = child.communicate(timeout=max(1, deadline - time.monotonic()))
        assert child.returncode == -signal.SIGKILL, err[-2000:]
        assert json.loads(manifest.read_text())["completed_layers"] == 2
        with pytest.raises((OSError, ValueError)):  # the killed run left nothing that loads as a model
            AutoModelForCausalLM.from_pretrained(out)

        resumed = run_child(script, out, "plain")
        stdout, err = resumed.communicate(timeout=180)
        assert resumed.returncode == 0, err[-3000:]
        assert "finished" in stdout
        assert "continuing with layer 2" in err
        assert_same_checkpoint(reference, out)
        assert not (out / CHECKPOINT_DIRNAME).exists()


def test_failed_save_keeps_previous_model_and_leaves_no_partial_directory(tmp_path, calib):
    first = ODLLMCompressor(tiny_model(), make_config())
    first.compress(calib)
    target = tmp_path / "model"
    first.save_pretrained(target)
    before = load_file(target / "model.safetensors")

    second = ODLLMCompressor(tiny_model(seed=3), make_config(ratio=0.3))
    second.compress(calib)

    def broken_save(directory, **kwargs):
        Path(directory, "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    second.model.save_pretrained = broken_save
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(target)
    with pytest.raises(OSError):
        second.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary leftovers
    after = load_file(target / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    AutoModelForCausalLM.from_pretrained(target)  # still a complete, loadable checkpoint


def test_corrupt_checkpoint_file_is_reported_not_loaded(tmp_path, monkeypatch):
    ids = calibration_ids(12, 16)
    ckpt = tmp_path / "ckpt"
    interrupted_checkpoint(monkeypatch, ids, ckpt, layer=1)
    layer_file = ckpt / "layer-00000.safetensors"
    layer_file.write_bytes(layer_file.read_bytes()[:50])  # truncated
    with pytest.raises(CheckpointError, match=r"layer-00000.safetensors is unreadable.*resume=False"):
        ODLLMCompressor(tiny_model(num_hidden_layers=NUM_LAYERS), make_config()).compress(
            ids, checkpoint_dir=ckpt, resume=True
        )
    (ckpt / "state-00001.safetensors").unlink()
    layer_file.unlink()
    with pytest.raises(CheckpointError, match=r"unreadable"):
        ODLLMCompressor(tiny_model(num_hidden_layers=NUM_LAYERS), make_config()).compress(
            ids, checkpoint_dir=ckpt, resume=True
        )
    # the old state file of layer 0 was removed once layer 1 was checkpointed
    assert sorted(p.name for p in ckpt.iterdir()) == ["layer-00001.safetensors", "manifest.json"]


def test_checkpoint_cleanup_only_removes_its_own_files(tmp_path, calib):
    shared = tmp_path / "work"
    shared.mkdir()
    (shared / "notes.txt").write_text("keep me")
    comp = ODLLMCompressor(tiny_model(), make_config())
    comp.compress(calib, checkpoint_dir=shared)
    assert (shared / "manifest.json").exists()
    comp.save_pretrained(shared / "model")
    assert sorted(p.name for p in shared.iterdir()) == ["model", "notes.txt"]
    # checkpointing into the output directory itself must not delete the saved model
    comp = ODLLMCompressor(tiny_model(), make_config())
    comp.compress(calib, checkpoint_dir=tmp_path / "out")
    comp.save_pretrained(tmp_path / "out")
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
