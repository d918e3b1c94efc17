"""Publishing a finished folder to the Hub."""

from __future__ import annotations

import os

from .common import _first_line, PushError


def push_folder(folder: str, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Upload a finished converted folder (card included) to the Hub; PushError in one line if it cannot."""
    from huggingface_hub import HfApi, constants, get_token

    hint = f"the converted folder {folder} is complete; upload it later with `hf upload {repo_id} {folder}`"
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise PushError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); {hint}")
    token = get_token()
    if not token:
        raise PushError(
            f"cannot push to {repo_id}: no Hugging Face token (run `hf auth login` or set HF_TOKEN); {hint}"
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=folder, repo_id=url.repo_id, repo_type="model",
            commit_message=commit_message or "Upload AttnVariantLlama conversion (hf-attn-variants)",
        )
    except Exception as error:
        raise PushError(f"cannot push to {repo_id}: {type(error).__name__}: {_first_line(error)}; {hint}") from error
    return str(url)
