"""A local dir as is, or a Hugging Face Hub repo downloaded into the HF cache (gated repos need HF_TOKEN)."""

from __future__ import annotations

import os
from pathlib import Path


def local_or_hub(name: str, repo_type: str = "model", what: str = "run dir") -> Path:
    """`name`: a local dir, or a Hub repo id (`owner/name`) of type `repo_type` ("model" or "dataset")."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name}: no such local {what}, and not a Hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, repo_type=repo_type, token=os.environ.get("HF_TOKEN")))
    except GatedRepoError as e:
        raise PermissionError(f"{name} is gated: request access on the Hub and export HF_TOKEN=<your token>") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{name!r} is neither a local {what} nor a Hub {repo_type} repo you can read") from e
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:  # offline, or the Hub unreachable
        raise FileNotFoundError(
            f"{name}: no such local {what} (from {Path.cwd()}), and as a Hub {repo_type} repo id it could not be "
            f"fetched: {type(e).__name__}: {e}"
        ) from e
