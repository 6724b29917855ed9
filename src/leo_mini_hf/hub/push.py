"""Upload a checkpoint folder to the Hugging Face Hub."""

import os
from pathlib import Path

from huggingface_hub import HfApi, get_token


class PushError(RuntimeError):
    """The upload could not be done; the local folder is untouched."""


def push_folder(folder, repo_id: str, private: bool = False, revision: str | None = None,
                endpoint: str | None = None) -> str:
    """create_repo + upload_folder. The token comes from HF_TOKEN or `hf auth login`, never from arguments."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} is not a checkpoint folder (needs config.json and *.safetensors); "
                         "run `leo-mini export` first")
    if "/" not in repo_id:
        raise ValueError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    token = get_token()
    if not token:
        raise PushError("No Hugging Face token found: set HF_TOKEN or run `hf auth login`")
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision,
                                   commit_message="Upload LEO-MINI checkpoint")
    except Exception as error:  # network, auth and Hub errors alike: one clear message, the folder untouched
        raise PushError(f"Upload of {folder} to {repo_id} at {endpoint} failed: {type(error).__name__}: {error}") from error
    return str(getattr(commit, "commit_url", commit))
