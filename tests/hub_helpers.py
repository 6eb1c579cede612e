"""Shared helpers of the Hub/model-card/CLI tests: a compressed tiny recommender and a recording HfApi."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from conftest import calibration_ids, tiny_model, word_tokenizer


def make_base_dir(root: Path, license: str | None = "mit") -> Path:
    """A dense tiny Llama saved like a Hub checkpoint: config, weights, tokenizer, card, item index."""
    base = root / "base"
    model = tiny_model()
    tokenizer = word_tokenizer()
    tokenizer.add_tokens(["<a_0>", "<a_1>", "<b_0>", "<b_1>"])  # the item index tokens
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    if license:
        (base / "README.md").write_text(f"---\nlicense: {license}\n---\n\n# tiny base\n")
    (base / "item_index.json").write_text(json.dumps({"levels": 2, "item_ids": ["a", "b"], "codes": [[0, 1], [1, 0]]}))
    return base


def compressed(root: Path, ratio: float = 0.5, license: str | None = "mit"):
    from optimum_odllm import ODLLMCompressor, ODLLMConfig

    base = make_base_dir(root, license)
    compressor = ODLLMCompressor.from_pretrained(
        str(base), config=ODLLMConfig(ratio=ratio, rank_multiple=8, min_calibration_tokens=16)
    )
    compressor.compress(calibration_ids(16, 24))
    return compressor


@dataclass
class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records calls, keeps a copy of every uploaded file."""

    token: object = None
    calls: list = field(default_factory=list)
    uploads: dict = field(default_factory=dict)

    def __call__(self, token=None, **kwargs):  # used as the HfApi class
        self.token = token
        return self

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, branch, **kwargs):
        self.calls.append(("create_branch", repo_id, {"branch": branch, **kwargs}))

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        operations = list(operations)
        self.calls.append(("create_commit", repo_id, {"commit_message": commit_message, **kwargs}))
        for op in operations:
            self.uploads[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")

    def materialize(self, directory: Path) -> Path:
        """The uploaded files laid out as the Hub repo would hold them."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.uploads.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
        return directory

    def names(self, kind):
        return [c for c in self.calls if c[0] == kind]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
