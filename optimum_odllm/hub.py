"""Publishing compressed recommenders on the Hugging Face Hub in a single commit.

Everything a user needs (``config.json`` with the ``odllm`` quantization config, safetensors factors,
tokenizer files, ``item_index.json`` and the model card) is written to a staged directory with the
same atomic ``save_pretrained`` as a local save, then uploaded with one ``HfApi.create_commit``: a
reader never sees a repo whose card describes weights that are not there yet.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitOperationAdd, HfApi
from transformers.utils import logging


if TYPE_CHECKING:
    from .compressor import ODLLMCompressor


logger = logging.get_logger(__name__)


def staged_operations(folder: str | Path) -> list[CommitOperationAdd]:
    """One ``CommitOperationAdd`` per file under ``folder`` (POSIX paths relative to it, sorted)."""
    folder = Path(folder)
    return [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload OD-LLM compressed model",
    commit_description: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
) -> Any:
    """Create the repo (and branch ``revision``) if needed, then upload ``folder`` as one commit."""
    if not repo_id or not isinstance(repo_id, str):
        raise ValueError("push_to_hub needs a repo_id like 'your-username/my-model-odllm-0.5'.")
    api = api if api is not None else HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
    operations = staged_operations(folder)
    if not operations:
        raise RuntimeError(f"Nothing to upload: {folder} is empty.")
    logger.info(f"Uploading {len(operations)} files to {repo_id} ({', '.join(op.path_in_repo for op in operations)})")
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        commit_description=commit_description,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


def push_compressed_to_hub(
    compressor: "ODLLMCompressor",
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    eval_results: Any = None,
    api: HfApi | None = None,
    **save_kwargs: Any,
) -> Any:
    """Save the compressed model (model, tokenizer, item index, card naming ``repo_id``) and push it in one commit.

    Args:
        repo_id: ``"owner/name"`` (created if missing; ``private`` only applies on creation).
        revision: branch to commit to (created from ``main`` if missing).
        token: Hub token (default: the one from ``hf auth login``).
        eval_results: ``{dataset: {"HR@10": v, ...}}`` published as ``model-index`` in the card
            (default: ``compressor.eval_results`` if set).
    Returns: the ``huggingface_hub.CommitInfo`` of the commit.
    """
    if not repo_id or not isinstance(repo_id, str):
        raise ValueError("push_to_hub needs a repo_id like 'your-username/my-model-odllm-0.5'.")
    if not compressor.config.is_compressed:
        raise RuntimeError(
            "Nothing to push yet: call compressor.compress(calibration_data) first "
            "(or push an already compressed model with model.push_to_hub(repo_id))."
        )
    previous = (getattr(compressor, "card_repo_id", None), getattr(compressor, "eval_results", None))
    compressor.card_repo_id = repo_id
    if eval_results is not None:
        compressor.eval_results = eval_results
    try:
        with tempfile.TemporaryDirectory(prefix="odllm-push-") as tmp:
            stage = compressor.save_pretrained(Path(tmp) / "stage", **save_kwargs)
            message = commit_message or f"Upload OD-LLM compressed model (ratio {compressor.config.ratio:g})"
            return push_folder_to_hub(
                stage, repo_id, private=private, revision=revision, token=token, commit_message=message,
                create_pr=create_pr, api=api,
            )
    finally:
        compressor.card_repo_id, compressor.eval_results = previous
