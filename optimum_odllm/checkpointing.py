"""Per-layer checkpoints of a compression run, so an interrupted run resumes where it stopped.

After decoder layer ``k`` is compressed, :class:`LayerCheckpointer` writes (each file atomically:
temporary name, ``fsync``, ``os.replace``):

* ``layer-0000k.safetensors``: the ``down.weight``/``up.weight`` factors of that layer's modules,
  exactly as they sit in the model (so restoring them is bit-identical);
* ``state-0000k.safetensors``: the hidden states the next layer needs (the original model's
  ``reference.<batch>`` stream and, with progressive alignment, the ``drifted.<batch>`` stream);
* ``manifest.json`` last: fingerprints of the settings, calibration data and model, the number of
  completed layers, and the per-module reports. The manifest only ever points at complete files, so
  a kill at any moment leaves either the previous or the new consistent state.

Only safetensors and JSON are read back: no pickle, nothing executable.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.utils import logging


logger = logging.get_logger(__name__)

CHECKPOINT_DIRNAME = ".odllm_checkpoint"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: per-file SHA-256 digests in the manifest

class CheckpointError(ValueError):
    """A resume checkpoint is unreadable or was made with different settings, data or model."""


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def hash_tensors(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def settings_fingerprint(config: Any) -> dict[str, Any]:
    """Every setting of the config, read from the settings table (so none can be forgotten), keyed for the manifest."""
    return {f"setting {name}": value for name, value in json.loads(json.dumps(config.settings_dict())).items()}


def model_fingerprint(model: torch.nn.Module, targets: dict[str, torch.nn.Module], ranks: dict[str, int | None]) -> str:
    """Architecture, target ranks and every byte of every parameter and buffer (tied weights once).

    All of them can change a result: the targeted weights, but also norms, biases and the embeddings
    that feed layer 0. Hashing is about 1.5 GB/s, a few seconds for a 7B model, once per run.
    """
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    for name, module in targets.items():
        digest.update(f"{name}|{type(module).__name__}|{ranks.get(name)}|".encode())
    seen: set[int] = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (so a flipped bit in a resume file is caught, not resumed from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, before any work starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".odllm-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"checkpoint_dir {directory} cannot be written ({type(err).__name__}: {err}). "
            "Pass a writable directory (or checkpoint=False / no checkpoint_dir)."
        ) from None
    return directory


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


@dataclass
class ResumeState:
    """What a checkpoint restores: factors of layers ``0..completed_layers-1`` and the streams for the next one."""

    completed_layers: int
    factors: dict[str, torch.Tensor]
    modules: list[dict[str, Any]]
    reference: list[torch.Tensor]
    drifted: list[torch.Tensor] | None
    refinement: list[dict[str, Any]] = field(default_factory=list)  # per refined layer, as in the report


class LayerCheckpointer:
    """Writes and reads the per-layer checkpoint in ``directory`` for one run identified by ``fingerprint``."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any]):
        self.directory = Path(directory)
        self.fingerprint = dict(fingerprint)
        self._manifest: dict[str, Any] | None = None

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(
            f"Cannot resume from the checkpoint in {self.directory}: {problem}. "
            f"Delete {self.directory} or pass resume=False to start over."
        )

    def read_manifest(self) -> dict[str, Any]:
        """The validated manifest; raises :class:`CheckpointError` naming the problem."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self.fail(f"{MANIFEST} is unreadable ({type(err).__name__}: {err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            raise self.fail(f"{MANIFEST} is not an OD-LLM checkpoint manifest of format {FORMAT_VERSION}")
        saved = manifest.get("fingerprint")
        if not isinstance(saved, dict):
            raise self.fail(f"{MANIFEST} has no fingerprint")
        different = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if different:
            raise self.fail(
                f"it was made with different {', '.join(different)} (checkpoint was made with different settings/data)"
            )
        layers = manifest.get("layers")
        completed = manifest.get("completed_layers")
        if (
            not isinstance(layers, list)
            or isinstance(completed, bool)
            or not isinstance(completed, int)
            or completed != len(layers)
            or completed < 1
            or not all(isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("modules"), list) for entry in layers)
            or not isinstance(manifest.get("state_file"), str)
        ):
            raise self.fail(f"{MANIFEST} is malformed")
        return manifest

    def _load(self, file_name: str) -> dict[str, torch.Tensor]:
        path = self.directory / file_name
        if Path(file_name).name != file_name or not file_name.endswith(".safetensors"):
            raise self.fail(f"{MANIFEST} names an invalid file {file_name!r}")
        try:
            tensors = load_file(path)
            actual = file_digest(path)
        except (OSError, SafetensorError, ValueError) as err:
            raise self.fail(f"{file_name} is unreadable ({type(err).__name__}: {err})") from None
        if actual != (self._manifest or {}).get("digests", {}).get(file_name):
            raise self.fail(f"{file_name} is damaged: its SHA-256 digest does not match the one in {MANIFEST}")
        return tensors

    def load(self, num_batches: int) -> ResumeState:
        """Everything needed to continue after the last completed layer."""
        manifest = self.read_manifest()
        self._manifest = manifest
        factors: dict[str, torch.Tensor] = {}
        modules: list[dict[str, Any]] = []
        refinement: list[dict[str, Any]] = []
        for entry in manifest["layers"]:
            factors.update(self._load(entry["file"]))
            modules.extend(entry["modules"])
            if isinstance(entry.get("refinement"), dict):
                refinement.append(entry["refinement"])
        state = self._load(manifest["state_file"])
        try:
            reference = [state[f"reference.{b}"] for b in range(num_batches)]
            drifted = [state[f"drifted.{b}"] for b in range(num_batches)] if "drifted.0" in state else None
        except KeyError as err:
            raise self.fail(f"{manifest['state_file']} lacks hidden states {err}") from None
        return ResumeState(manifest["completed_layers"], factors, modules, reference, drifted, refinement)

    def restore(
        self,
        state: ResumeState,
        expected_shapes: dict[str, dict[str, tuple[int, ...]]],
        install: Callable[[str, dict[str, torch.Tensor]], None],
    ) -> int:
        """Hand the checkpointed factors of layers ``0..completed-1`` to ``install``; return the next layer.

        ``expected_shapes`` maps every module those layers should have factorized to ``{key suffix: shape}``
        (``{"up.weight": (out, r), "down.weight": (r, in)}``, or the quantized buffers); anything else in the
        checkpoint is refused. ``install(name, {suffix: tensor})`` puts one module back.
        """
        saved = {key.rsplit(".", 2)[0] for key in state.factors}
        if saved != set(expected_shapes):
            odd = sorted(saved ^ set(expected_shapes))
            raise self.fail(f"its factors do not match the modules to compress (e.g. {odd[:3]})")
        for name in sorted(expected_shapes):
            tensors = {suffix: state.factors.get(f"{name}.{suffix}") for suffix in expected_shapes[name]}
            stored = {key for key in state.factors if key.rsplit(".", 2)[0] == name}
            if (
                stored != {f"{name}.{suffix}" for suffix in tensors}
                or any(t is None or tuple(t.shape) != expected_shapes[name][s] for s, t in tensors.items())
            ):
                raise self.fail(f"the factors of {name} are missing or have the wrong shape")
            install(name, tensors)
        return state.completed_layers

    def save_layer(
        self,
        index: int,
        factors: dict[str, torch.Tensor],
        modules: list[dict[str, Any]],
        reference: list[torch.Tensor],
        drifted: list[torch.Tensor] | None,
        refinement: dict[str, Any] | None = None,
    ) -> None:
        """Record that layers ``0..index`` are done (factors of layer ``index`` + streams for layer ``index+1``;
        ``refinement``: that layer's entry of the report's ``refinement``, if it was refined)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._manifest is None:
            # index > 0 without load(): continue the manifest on disk (it holds layers 0..index-1)
            self._manifest = self.read_manifest() if index > 0 else {
                "format": FORMAT_VERSION, "fingerprint": self.fingerprint, "layers": []
            }
        layer_file = f"layer-{index:05d}.safetensors"
        state_file = f"state-{index:05d}.safetensors"
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in factors.items()}
        _atomic_write(self.directory / layer_file, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        digests = dict(self._manifest.get("digests", {}))
        digests[layer_file] = file_digest(self.directory / layer_file)
        state: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        streams = [("reference", reference)] + ([("drifted", drifted)] if drifted is not None else [])
        for stream, hidden in streams:
            for b, h in enumerate(hidden):
                h = h.detach().to("cpu").contiguous()
                if h.data_ptr() in seen:  # safetensors refuses shared storage: store a copy
                    h = h.clone()
                seen.add(h.data_ptr())
                state[f"{stream}.{b}"] = h
        _atomic_write(self.directory / state_file, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        digests[state_file] = file_digest(self.directory / state_file)
        previous_state = self._manifest.get("state_file")
        if previous_state and previous_state != state_file:
            digests.pop(previous_state, None)
        self._manifest["digests"] = digests
        layer_entry = {"index": index, "file": layer_file, "modules": modules}
        if refinement is not None:
            layer_entry["refinement"] = refinement
        self._manifest["layers"] = self._manifest["layers"][:index] + [layer_entry]
        self._manifest["completed_layers"] = index + 1
        self._manifest["state_file"] = state_file
        text = json.dumps(self._manifest, indent=1)
        _atomic_write(self.manifest_path, lambda p: p.write_text(text))
        if previous_state and previous_state != state_file:
            (self.directory / previous_state).unlink(missing_ok=True)

    def clear(self) -> None:
        remove_checkpoint(self.directory)
        self._manifest = None


def remove_checkpoint(directory: str | os.PathLike) -> None:
    """Delete the checkpoint files in ``directory`` (only ours), then the directory itself if it is empty."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        name = path.name.lstrip(".")
        ours = name.startswith((MANIFEST, "layer-", "state-")) and (".safetensors" in name or name.startswith(MANIFEST))
        if ours and path.is_file():
            path.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass  # the user keeps other files there
