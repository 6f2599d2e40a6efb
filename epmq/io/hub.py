"""Where a model or dataset source lives (a local file or folder, or a hub repository), and hub access that fails
fast: a hub id is either fetched, found in the local cache, or refused at once with a ValueError naming it.

A source is local when it exists on disk; one written as a path (starting with '/', '.' or '~') that does not
exist is a mistake, never a hub id; anything else of the shape 'owner/name' is a hub id (`local_path`,
`written_as_path`, `is_hub_id`: every loader of models and datasets decides with these three).

huggingface_hub's own downloads wait without a time limit when the network drops packets (measured:
snapshot_download still waiting after 60 s against an endpoint that accepts connections and never
answers), and datasets.load_dataset retries. So every id is first asked about with one metadata
request that has a timeout (EPMQ_HUB_TIMEOUT seconds, default 5; a silent network costs about
twice that, httpx tries the read twice):

- the hub answers: download (or reuse the cache) as usual;
- the hub says the repository does not exist or is gated: ValueError naming the id;
- no answer (offline, DNS failure, timeout) or HF_HUB_OFFLINE=1: the local cache only (models:
  huggingface_hub's; datasets: the datasets cache), and a ValueError naming the id and the reason
  when it is not there.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TIMEOUT_S = 5.0
PATH_PREFIXES = ("/", ".", "~")
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES  # weight files: never repositories


def local_path(source) -> Path | None:
    """The existing file or folder a source (str or Path, ~ expanded) names; None otherwise."""
    if not isinstance(source, (str, Path)):
        return None
    path = Path(os.path.expanduser(str(source)))
    return path if path.exists() else None


def written_as_path(source) -> bool:
    """Whether a source reads as a path (starts with '/', '.' or '~', or holds a backslash): never a hub id."""
    text = str(source)
    return text.startswith(PATH_PREFIXES) or "\\" in text


def is_hub_id(source) -> bool:
    """Whether a source has the shape of a hub repository id, 'owner/name' (not a path, not a weight file)."""
    text = str(source)
    return text.count("/") == 1 and not written_as_path(text) and not text.endswith(WEIGHT_SUFFIXES)


def timeout_s() -> float:
    """Seconds one metadata request may wait for an answer (EPMQ_HUB_TIMEOUT, default 5)."""
    value = os.environ.get("EPMQ_HUB_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"EPMQ_HUB_TIMEOUT must be a number of seconds, got {value!r}") from None


def offline() -> bool:
    """Whether the user switched the hub off (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def unreachable(repo_id: str, repo_type: str = "model") -> str | None:
    """None when the hub answers for `repo_id`, else why it cannot be reached (for the message).

    Raises ValueError when the hub answers that the repository does not exist or needs a token.
    """
    if offline():
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout_s())
    except GatedRepoError:
        raise ValueError(f"{repo_type} '{repo_id}' on the Hugging Face hub is gated: log in "
                         f"(`hf auth login`) with an account that has access") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_type} '{repo_id}' does not exist on the Hugging Face hub (or is private)") from None
    except Exception as e:  # no connection, timeout, proxy or server error: all mean "no answer"
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return None


def snapshot(repo_id: str, allow_patterns: list[str] | None = None, what: str = "model") -> Path:
    """Local folder of hub model `repo_id` (downloaded, or from the cache when the hub does not answer).

    what: how the message names the source (e.g. "suite.base").
    """
    from huggingface_hub import snapshot_download

    reason = unreachable(repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=reason is not None))
    except Exception as e:
        if reason is None:  # the hub answered, the download failed (disk, permissions, interrupted transfer)
            raise ValueError(f"{what} '{repo_id}': download from the Hugging Face hub failed: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}") from None
        raise ValueError(f"{what} '{repo_id}' is not a local folder, and as a hub id: could not reach the Hugging "
                         f"Face hub ({reason}) and it is not in the local cache; give a local folder, or fetch it "
                         f"on a machine online") from None


def load_dataset(repo_id: str, name: str | None = None, what: str = "dataset"):
    """DatasetDict of hub dataset `repo_id` (config `name`); when the hub does not answer, from the
    datasets cache only (datasets' own retries on a dead network take 20 s and more)."""
    import datasets
    import datasets.config

    reason = unreachable(repo_id, "dataset")
    offline_before = datasets.config.HF_HUB_OFFLINE  # read by datasets at import; HF_HUB_OFFLINE may be set later
    datasets.config.HF_HUB_OFFLINE = offline_before or reason is not None
    try:
        return datasets.load_dataset(repo_id, name)
    except Exception as e:
        why = (f"could not reach the Hugging Face hub ({reason}) and it is not in the datasets cache"
               if reason is not None else f"could not be loaded: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        config = f" (config {name!r})" if name else ""
        raise ValueError(f"{what} '{repo_id}'{config}: {why}; give a save_to_disk folder instead") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline_before
