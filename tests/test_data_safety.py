"""Data safety and honest loading (issue 9): saving never destroys what the library did not write,
a checkpoint never loads with random projections, resume fingerprints cover every setting and byte."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import calibration_ids, tiny_model
from hub_helpers import make_base_dir
from optimum_odllm import ODLLMCompressor, ODLLMConfig
from optimum_odllm.checkpointing import CheckpointError
from optimum_odllm.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CLI = ["--rank-multiple", "8", "--num-samples", "16", "--min-calibration-tokens", "16", "--device", "cpu"]


def make_config(**overrides) -> ODLLMConfig:
    settings = dict(ratio=0.5, rank_multiple=8, calibration_batch_size=4, min_calibration_tokens=16)
    settings.update(overrides)
    return ODLLMConfig(**settings)


def compressed(seed: int = 0, **config) -> ODLLMCompressor:
    compressor = ODLLMCompressor(tiny_model(seed=seed), make_config(**config))
    compressor.compress(calibration_ids())
    return compressor


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 19)[None]).logits


# ------------------------------------------------------------------ 1. saving never deletes foreign files
def test_save_into_existing_directory_keeps_the_users_files(tmp_path):
    target = tmp_path / "runs"
    (target / "other-run").mkdir(parents=True)
    (target / "other-run" / "model.safetensors").write_bytes(b"another run")
    (target / "notes.txt").write_text("keep me")
    compressor = compressed()
    compressor.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert (target / "other-run" / "model.safetensors").read_bytes() == b"another run"
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    torch.testing.assert_close(logits(reloaded), logits(compressor.model), rtol=0, atol=1e-5)
    # saving again replaces our own files only
    second = compressed(seed=1, ratio=0.3)
    second.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "keep me"
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(target)), logits(second.model), rtol=0, atol=1e-5)
    assert not [p.name for p in target.iterdir() if p.name.startswith(".odllm-staging")]  # no staging leftovers


def test_save_to_current_directory_keeps_everything(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text("print('mine')")
    monkeypatch.chdir(tmp_path)
    compressed().save_pretrained(".")
    assert (tmp_path / "train.py").read_text() == "print('mine')"
    assert (tmp_path / "config.json").is_file()


def test_save_onto_an_existing_file_is_refused(tmp_path):
    target = tmp_path / "model"
    target.write_text("a file, not a directory")
    with pytest.raises((ValueError, FileExistsError), match="is a file"):
        compressed().save_pretrained(target)
    assert target.read_text() == "a file, not a directory"


def test_save_onto_the_source_model_directory_is_refused(tmp_path):
    base = make_base_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    compressor = ODLLMCompressor.from_pretrained(str(base), config=make_config())
    compressor.compress(calibration_ids())
    with pytest.raises(ValueError, match="source model"):
        compressor.save_pretrained(base)
    with pytest.raises(ValueError, match="source model"):
        compressor.save_pretrained(str(base) + "/.")
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_cli_output_onto_the_input_model_is_refused_and_leaves_it_intact(tmp_path, capsys):
    base = make_base_dir(tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join("w1 w2 w3 w4 w5 w6 w7 w8" for _ in range(16)))
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(base), "-o", str(base), "--calibration", str(calib), *TINY_CLI])
    assert exit_info.value.code == 2
    assert "source model" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_crash_leftovers_are_cleaned_on_next_save_and_never_load(tmp_path):
    target = tmp_path / "model"
    # what an interrupted save of version 0.1 leaves behind: its staging sibling (only files it was writing) ...
    old_tmp = tmp_path / ".model.tmp-abc123"
    old_tmp.mkdir()
    (old_tmp / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".model.tmp-notes").write_text("a file of the user's with a similar name")
    compressed().save_pretrained(target)
    assert not old_tmp.exists()
    assert (tmp_path / ".model.tmp-notes").exists()  # a file: not ours


def test_a_version_01_backup_of_the_users_directory_is_restored_or_kept(tmp_path, caplog):
    # ... and the previous directory it had renamed aside, which may hold the user's own files
    target = tmp_path / "model"
    backup = tmp_path / f".model.old-{os.getpid() + 1}"
    backup.mkdir()
    (backup / "notes.txt").write_text("only copy")
    compressed().save_pretrained(target)  # target missing: the backup is moved back, then saved into
    assert not backup.exists() and (target / "notes.txt").read_text() == "only copy"
    assert (target / "config.json").is_file()
    backup.mkdir()
    (backup / "notes.txt").write_text("another only copy")
    with caplog.at_level("WARNING"):
        compressed(seed=1).save_pretrained(target)  # target present: the backup is left alone, with a warning
    assert (backup / "notes.txt").read_text() == "another only copy"
    assert "may contain your own files" in caplog.text


@pytest.mark.parametrize("leftover", [".model.tmp-abc123", ".model.old-4242", ".odllm-staging-x1y2"])
def test_a_complete_looking_save_leftover_is_refused_by_the_loader(tmp_path, leftover):
    # version 0.1 staged whole models in sibling directories; a kill could leave one that looks complete
    compressed().save_pretrained(tmp_path / "model")
    shutil.copytree(tmp_path / "model", tmp_path / leftover)
    with pytest.raises(ValueError, match="left behind by an interrupted OD-LLM save"):
        AutoModelForCausalLM.from_pretrained(tmp_path / leftover)


def test_interrupted_save_leaves_no_loadable_half(tmp_path, monkeypatch):
    from optimum_odllm import saving

    target = tmp_path / "model"
    compressed().save_pretrained(target)
    second = compressed(seed=3, ratio=0.3)
    moved: list[str] = []
    original = saving._publish_file

    def crash_after_two(src, dst):
        if len(moved) == 2:
            raise OSError("killed")
        moved.append(Path(dst).name)
        original(src, dst)

    monkeypatch.setattr(saving, "_publish_file", crash_after_two)
    with pytest.raises(OSError, match="killed"):
        second.save_pretrained(target)
    assert moved and "config.json" not in moved  # the config is published last
    # half of the files are new: the directory must not be loadable as a model at all
    assert not (target / "config.json").exists()
    with pytest.raises((OSError, ValueError)):
        AutoModelForCausalLM.from_pretrained(target)
    monkeypatch.undo()
    second.save_pretrained(target)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(target)), logits(second.model), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ 2. loading without `import optimum_odllm`
_LOAD_WITHOUT_IMPORT = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    except Exception as err:
        print("FAILED:", type(err).__name__, err)
        sys.exit(3)
    assert "optimum_odllm" not in sys.modules
    with torch.no_grad():
        out = model(torch.arange(3, 19)[None]).logits
    torch.save(out, sys.argv[2])
    print("LOADED")
    """
)


def load_in_fresh_process(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "load_plain.py"
    script.write_text(_LOAD_WITHOUT_IMPORT)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )


def assert_never_random(result: subprocess.CompletedProcess, expected: torch.Tensor, tmp_path: Path) -> None:
    """Either an error that names the fix, or exactly the compressed model's logits."""
    text = result.stdout + result.stderr
    if result.returncode == 0:
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-5)
    else:
        assert result.returncode == 3, text[-3000:]
        assert "pip install optimum-odllm" in text.replace("_", "-") or "pip_install_optimum-odllm" in text, text[-3000:]
        assert "import_optimum_odllm" in text or "import optimum_odllm" in text, text[-3000:]


def test_loading_without_the_package_never_gives_random_projections(tmp_path):
    compressor = compressed()
    compressor.save_pretrained(tmp_path / "out")
    assert_never_random(load_in_fresh_process(tmp_path / "out", tmp_path), logits(compressor.model), tmp_path)


def test_plain_save_pretrained_of_a_loaded_compressed_model_is_guarded_too(tmp_path):
    compressor = compressed()
    compressor.save_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "plain")  # what model.push_to_hub uploads
    assert_never_random(load_in_fresh_process(tmp_path / "plain", tmp_path), logits(compressor.model), tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    torch.testing.assert_close(logits(reloaded), logits(compressor.model), rtol=0, atol=1e-5)


def test_load_with_the_package_has_no_unexpected_key_warnings(tmp_path, caplog):
    compressed().save_pretrained(tmp_path / "out")
    with caplog.at_level("WARNING"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert "UNEXPECTED" not in caplog.text and "MISSING" not in caplog.text and "MISMATCH" not in caplog.text


# ------------------------------------------------------------------ 3. resume fingerprints
def _interrupt_after_first_layer(monkeypatch, compressor, ckpt, ids):
    from optimum_odllm import checkpointing

    class Stop(Exception):
        pass

    original = checkpointing.LayerCheckpointer.save_layer

    def save_layer(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        raise Stop

    with monkeypatch.context() as patch:
        patch.setattr(checkpointing.LayerCheckpointer, "save_layer", save_layer)
        with pytest.raises(Stop):
            compressor.compress(ids, checkpoint_dir=ckpt, resume=True)


def test_resume_refuses_a_different_alignment_damping(tmp_path, monkeypatch):
    ids, ckpt = calibration_ids(), tmp_path / "ckpt"
    _interrupt_after_first_layer(monkeypatch, ODLLMCompressor(tiny_model(), make_config()), ckpt, ids)
    with pytest.raises(CheckpointError, match="alignment_damping"):
        ODLLMCompressor(tiny_model(), make_config(alignment_damping=0.05)).compress(ids, checkpoint_dir=ckpt, resume=True)


def test_every_config_setting_is_part_of_the_resume_fingerprint(monkeypatch):
    from optimum_odllm import solvers
    from optimum_odllm.checkpointing import settings_fingerprint

    monkeypatch.setitem(solvers.ALIGNMENTS, "test_variant", solvers.ALIGNMENTS["least_squares"])
    base = make_config()
    changed = {
        "ratio": 0.4, "whitening": False, "progressive": False, "target_modules": ["q_proj"],
        "modules_to_not_convert": ["k_proj"], "rank_multiple": 4, "num_calibration_samples": 8,
        "calibration_seq_len": 16, "min_calibration_tokens": 8, "calibration_batch_size": 2,
        "covariance_dtype": "float32", "solver_dtype": "float32", "svd_driver": "gesvda", "alignment_damping": 0.05,
        "block_name_to_compress": "model.layers", "alignment": "test_variant",
        "factor_bits": 8, "factor_group_size": 64, "factor_quantizer": "rtn", "allow_undamped_alignment": True,
        "refine_steps": 0, "refine_lr": 1e-3,
    }
    settings = set(ODLLMConfig.settings())
    assert settings >= set(changed), settings ^ set(changed)
    for name in settings:
        assert name in changed, f"add {name} to this test"
        assert settings_fingerprint(make_config(**{name: changed[name]})) != settings_fingerprint(base), name


def test_resume_refuses_a_model_that_differs_in_a_middle_row(tmp_path, monkeypatch):
    ids, ckpt = calibration_ids(), tmp_path / "ckpt"
    _interrupt_after_first_layer(monkeypatch, ODLLMCompressor(tiny_model(), make_config()), ckpt, ids)
    other = tiny_model()
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[50, 3] += 0.5
        other.model.layers[1].post_attention_layernorm.weight[7] += 0.5
    with pytest.raises(CheckpointError, match="model"):
        ODLLMCompressor(other, make_config()).compress(ids, checkpoint_dir=ckpt, resume=True)


def test_resume_detects_a_flipped_bit_in_a_layer_file(tmp_path, monkeypatch):
    ids, ckpt = calibration_ids(), tmp_path / "ckpt"
    _interrupt_after_first_layer(monkeypatch, ODLLMCompressor(tiny_model(), make_config()), ckpt, ids)
    layer_file = ckpt / "layer-00000.safetensors"
    data = bytearray(layer_file.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes: safetensors still parses it
    layer_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="layer-00000.safetensors.*(digest|damaged)"):
        ODLLMCompressor(tiny_model(), make_config()).compress(ids, checkpoint_dir=ckpt, resume=True)


def test_unwritable_checkpoint_dir_fails_before_any_work(tmp_path, monkeypatch):
    from optimum_odllm import pipeline

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    called = []
    monkeypatch.setattr(pipeline, "capture_first_layer_inputs", lambda *a, **k: called.append(1))
    with pytest.raises((ValueError, OSError), match="checkpoint_dir"):
        ODLLMCompressor(tiny_model(), make_config()).compress(calibration_ids(), checkpoint_dir=blocker / "ckpt")
    assert not called


# ------------------------------------------------------------------ 4. fused models save loadable checkpoints
def test_fused_model_saves_a_checkpoint_that_loads_with_identical_logits(tmp_path):
    from optimum_odllm.fused import fuse_shared_inputs

    compressor = compressed()
    compressor.save_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = logits(model)
    assert fuse_shared_inputs(model) > 0
    model.save_pretrained(tmp_path / "fused")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "fused")), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ poor messages
def test_misspelled_config_keyword_is_refused_naming_the_closest_field():
    with pytest.raises(TypeError, match=r"raito.*ratio"):
        ODLLMConfig(raito=0.3)


def test_saved_config_with_extra_keys_still_loads():
    config = ODLLMConfig.from_dict({**make_config().to_dict(), "ranks": {"a.b": 4}, "written_by_a_newer_version": 1})
    assert config.ranks == {"a.b": 4}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratio", "2"], "ratio"),
        (["--rank-multiple", "0"], "rank_multiple"),
        (["--num-samples", "-3"], "num_calibration_samples"),
        (["--device", "bogus"], "device"),
    ],
)
def test_cli_value_errors_are_one_line_with_exit_status_2(tmp_path, capsys, argv, message):
    base = make_base_dir(tmp_path)
    base_err = capsys.readouterr().err  # noqa: F841  (progress bars of building the fixture)
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(base), "-o", str(tmp_path / "out"), "--calibration", "none", "--no-whitening",
              "--no-progressive", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_cuda_device_on_a_cpu_machine_is_a_clear_error(tmp_path, capsys):
    base = make_base_dir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(base), "-o", str(tmp_path / "out"), "--calibration", "none", "--no-whitening",
              "--no-progressive", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA" in capsys.readouterr().err


def test_cli_missing_model_path_and_compressed_model_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), "--calibration", "none",
              "--no-whitening", "--no-progressive"])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    compressed().save_pretrained(tmp_path / "small")
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(tmp_path / "small"), "-o", str(tmp_path / "out"), "--calibration", "none",
              "--no-whitening", "--no-progressive"])
    assert exit_info.value.code == 2
    assert "already OD-LLM-compressed" in capsys.readouterr().err


def test_optimum_cli_odllm_without_subcommand_prints_usage_and_exits_2():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    cli = Path(sys.executable).with_name("optimum-cli")
    out = subprocess.run([str(cli), "odllm"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "compress" in out.stdout + out.stderr
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("source", [None, "/definitely/not/here", "./not-here-either"])
def test_from_pretrained_of_a_missing_path_says_so(source):
    with pytest.raises((ValueError, OSError, TypeError), match="does not exist|is None"):
        ODLLMCompressor.from_pretrained(source)
