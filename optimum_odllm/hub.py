"""Publishing compressed recommenders on the Hugging Face Hub in a single commit.

Everything a user needs (``config.json`` with the ``odllm`` quantization config, safetensors factors,
tokenizer files, ``item_index.json`` and the model card) is written to a staged directory with the
same atomic ``save_pretrained`` as a local save, then uploaded with one ``HfApi.create_commit``: a
reader never sees a repo whose card describes weights that are not there yet.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from transformers.utils import logging

from .result import CompressionResult
from .saving import save_result


logger = logging.get_logger(__name__)


def staged_operations(folder: str | Path) -> list[CommitOperationAdd]:
    """One ``CommitOperationAdd`` per file under ``folder`` (POSIX paths relative to it, sorted; hidden files skipped)."""
    folder = Path(folder)
    return [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]


def check_repo_id(repo_id: Any) -> str:
    if not repo_id or not isinstance(repo_id, str):
        raise ValueError("push_to_hub needs a repo_id like 'your-username/my-model-odllm-0.5'.")
    return repo_id


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
    check_repo_id(repo_id)
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


def push_result_to_hub(
    result: CompressionResult,
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
    """Save the compressed model (model, tokenizer, artifacts, card naming ``repo_id``) and push it in one commit.

    Args:
        repo_id: ``"owner/name"`` (created if missing; ``private`` only applies on creation).
        revision: branch to commit to (created from ``main`` if missing).
        token: Hub token (default: the one from ``hf auth login``).
        eval_results: ``{dataset: {"HR@10": v, ...}}`` published as ``model-index`` in the card.
    Returns: the ``huggingface_hub.CommitInfo`` of the commit.
    """
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="odllm-push-") as tmp:
        stage = save_result(result, Path(tmp) / "stage", eval_results=eval_results, repo_id=repo_id, **save_kwargs)
        message = commit_message or f"Upload OD-LLM compressed model (ratio {result.config.ratio:g})"
        return push_folder_to_hub(
            stage, repo_id, private=private, revision=revision, token=token, commit_message=message,
            create_pr=create_pr, api=api,
        )
