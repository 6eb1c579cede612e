"""What every exporter shares: load a (compressed) model, a flat KV-cache signature, the files beside it.

Device runtimes take tensors, not ``transformers`` cache objects, so the model is wrapped in a module
whose inputs are ``input_ids, attention_mask, position_ids`` plus one key and one value tensor per layer
(``[batch, kv_heads, past, head_dim]``) and whose outputs are ``logits`` plus the updated keys/values.
Tracing that wrapper keeps every ``LowRankLinear`` as two matmuls: the factored graph reaches the runtime.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..extensions import collect_artifacts


METADATA_FILE = "odllm_export.json"
ITEM_INDEX_FILE = "item_index.json"  # same name as optimum_odllm.recsys.INDEX_FILE (not imported: no recsys deps)


def require_extra(extra: str, purpose: str, *modules: str) -> None:
    """Refuse early, in one line that names the pip extra, when a runtime package is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f'{purpose} needs {", ".join(missing)}, which is not installed: '
                          f'pip install "optimum-odllm[{extra}]"')


@dataclass(frozen=True)
class CacheLayout:
    """Shapes and names of the flat KV-cache signature (what a runtime needs to feed the exported graph)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> "CacheLayout":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                   head_dim, config.vocab_size)

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]

    def empty_past(self, batch: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        return [torch.zeros(batch, self.num_kv_heads, 0, self.head_dim, dtype=dtype) for _ in self.past_names]


def load_for_export(model_or_path: Any, dtype: torch.dtype = torch.float32,
                    dequantize: bool = False) -> tuple[nn.Module, Path | None]:
    """The model in ``dtype`` and eval mode, plus the directory it came from (for tokenizer and item index).

    A path is loaded with ``AutoModelForCausalLM.from_pretrained`` after importing ``optimum_odllm`` (which
    registers the quantizer, so the factors load as ``LowRankLinear``). ``dequantize`` merges the factors
    (``model.dequantize()``). An in-memory model is never changed: it is copied when dtype or layers change.
    """
    import optimum_odllm  # noqa: F401  (registers quant_method="odllm" before from_pretrained)

    if isinstance(model_or_path, (str, Path)):
        from transformers import AutoModelForCausalLM

        source = Path(model_or_path)
        if not source.is_dir():
            raise FileNotFoundError(
                f"{source} is not a directory: pass the directory a compressed model was saved to "
                "(compressor.save_pretrained or `optimum-cli odllm compress -o DIR`), or the model itself."
            )
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        return _maybe_dequantize(model, dequantize).eval(), source
    if not isinstance(model_or_path, nn.Module) or not hasattr(model_or_path, "config"):
        raise TypeError(f"expected a transformers causal LM or a directory, got {type(model_or_path).__name__}")
    model = model_or_path
    if next(model.parameters()).dtype != dtype or dequantize:
        model = _maybe_dequantize(copy.deepcopy(model).to(dtype), dequantize)
    name = getattr(model, "name_or_path", "") or ""
    source = Path(name) if name and Path(name).is_dir() else None
    return model.eval(), source


def _maybe_dequantize(model: nn.Module, dequantize: bool) -> nn.Module:
    if dequantize and getattr(model, "hf_quantizer", None) is not None:
        return model.dequantize()
    return model


def _cache_keyword(model: nn.Module) -> str:
    """``cache`` in recent transformers, ``past_key_values`` before (5.24 deprecates the old name)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class FlatCacheCausalLM(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` around a causal LM.

    With ``all_logits=False`` only the last position's logits are computed (``[batch, 1, vocab]``): that is
    all that generation and the recommender's beam search read, and it skips a ``[tokens, vocab]`` GEMM and
    copy at prefill. They come from the output embedding applied to the decoder's last hidden state as a
    2-D matrix (a 3-D ``[batch, 1, hidden]`` input makes ``torch.export`` specialize batch 1 away);
    :func:`check_signature` verifies that this equals the model's own logits before any export.
    """

    def __init__(self, model: nn.Module, all_logits: bool = True):
        super().__init__()
        self.model = model
        self.all_logits = all_logits
        self.layout = CacheLayout.from_config(model.config)
        self._cache_kw = _cache_keyword(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layout.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                      **{self._cache_kw: cache})
        if self.all_logits:
            out = self.model(**inputs)
            logits = out.logits
        else:
            out = self.model.get_decoder()(**inputs)
            logits = self.model.get_output_embeddings()(out.last_hidden_state[:, -1, :]).unsqueeze(1)
        flat = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (logits, *flat)


def check_signature(wrapper: FlatCacheCausalLM) -> None:
    """Raise before exporting if last-position-only logits differ from the model's own last-position logits."""
    if wrapper.all_logits:
        return
    inputs = example_inputs(wrapper.layout)
    with torch.no_grad():
        ours = wrapper(*inputs)[0][:, -1]
        full = FlatCacheCausalLM(wrapper.model, all_logits=True)(*inputs)[0][:, -1]
    if not torch.allclose(ours, full, atol=1e-5, rtol=1e-5):
        raise ValueError(
            f"{type(wrapper.model).__name__}: logits from the decoder's last hidden state and the output embedding "
            "differ from the model's own (its head does more than one Linear, e.g. logit scaling or soft-capping). "
            "Export with all_logits=True (CLI: --all-logits)."
        )


def example_inputs(layout: CacheLayout, batch: int = 2, seq: int = 3, past: int = 4,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Tracing inputs whose sizes are all different and > 1, so no dimension gets specialized."""
    ids = torch.randint(0, layout.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.zeros(batch, layout.num_kv_heads, past, layout.head_dim, dtype=dtype) for _ in layout.past_names]
    return (ids, mask, positions, *kv)


def dynamic_shapes(layout: CacheLayout) -> dict[str, Any]:
    """Batch, new tokens, past and total length all dynamic (unbounded: ONNX Runtime allocates per call)."""
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in layout.past_names),
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "generation_config.json")


def export_artifacts(model: nn.Module, source: Path | None, tokenizer: Any = None,
                     item_index: str | Path | None = None) -> dict[str, Path]:
    """The files to ship beside an export (``item_index.json``, plugins' files), checked by the same artifact
    hooks as a save; called before any export work, so a broken or mismatched index costs nothing.

    ``item_index`` defaults to the one in the model directory; with no ``tokenizer`` the one saved there is
    loaded, so index tokens are checked against the real vocabulary.
    """
    if item_index is None and source is not None and (source / ITEM_INDEX_FILE).is_file():
        item_index = source / ITEM_INDEX_FILE
    declared = {} if item_index is None else {ITEM_INDEX_FILE: Path(item_index)}
    if tokenizer is None and source is not None and declared:
        tokenizer = _saved_tokenizer(source)
    vocab_size = getattr(model.config, "vocab_size", None)
    return collect_artifacts(str(source) if source else None, declared, tokenizer, vocab_size)


def _saved_tokenizer(source: Path) -> Any:
    """The tokenizer saved in ``source``, or None when it has none (a bare model directory)."""
    if not any((source / name).is_file() for name in TOKENIZER_FILES if name != "generation_config.json"):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


def write_sidecars(model: nn.Module, source: Path | None, output_dir: Path, tokenizer: Any = None,
                   artifacts: dict[str, Path] | None = None, **metadata: Any) -> None:
    """Config, tokenizer, the checked ``artifacts`` (:func:`export_artifacts`) and the signature metadata
    beside the exported file.

    Tokenizer files are copied byte for byte from the model directory (no re-serialization that could
    change them) unless a ``tokenizer`` object is given, which is saved with ``save_pretrained``.
    """
    model.config.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    elif source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, output_dir / name)
    for name, path in (artifacts or {}).items():
        if (output_dir / name).exists():
            raise ValueError(f"an artifact hook asked to ship {name!r}, which would overwrite a file of the export; "
                             "rename the plugin's file.")
        shutil.copyfile(path, output_dir / name)
    layout = CacheLayout.from_config(model.config)
    info = {"layout": asdict(layout), "input_names": layout.input_names, "output_names": layout.output_names,
            **metadata}
    (output_dir / METADATA_FILE).write_text(json.dumps(info, indent=2))


def read_layout(directory: str | Path) -> CacheLayout:
    """The :class:`CacheLayout` an exporter wrote to ``directory``."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {directory} was not written by optimum_odllm.exporters "
            "(run export_onnx / export_executorch, or `optimum-cli odllm export ...`)."
        )
    return CacheLayout(**json.loads(path.read_text())["layout"])
