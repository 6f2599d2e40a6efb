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

Datasets: `load_dataset(..., splits=[...])` downloads only the files of the splits a run reads (svhn's
`extra` split is 1 GB of its 1.2 GB; resisc45 and gtsrb carry seven corruption splits). The split -> files
map comes from datasets' own reading of the repository (its README's configs, or its file layout), with
the features of its dataset card; the files are fetched with huggingface_hub into its cache and a small
manifest (split -> files, features, commit) is kept beside the datasets cache, so a later run without the
hub reads the same files. A repository that holds only a loading script (datasets 4 and later refuse to
run them) is read from the hub's parquet conversion branch, refs/convert/parquet, with a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from urllib.parse import unquote

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
PARQUET_BRANCH = "refs/convert/parquet"  # the hub's parquet conversion of every dataset repository
SCRIPT_REFUSED = "Dataset scripts are no longer supported"  # datasets' error for a repository with a loading script
SPLIT_FORMATS = ("parquet", "arrow", "json", "csv")  # builders whose files can be fetched split by split
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


def load_dataset(repo_id: str, name: str | None = None, what: str = "dataset", splits=None,
                 revision: str | None = None, check=None):
    """DatasetDict of hub dataset `repo_id` (config `name`, branch, tag or commit `revision`); when the hub does
    not answer, from the local caches only (datasets' own retries on a dead network take 20 s and more).

    splits: the splits to load (None: all); only their files are downloaded.
    check: called as check(split sizes {split: rows} or None, features or None) from the dataset card before
        any data file is downloaded; raise there to stop early (e.g. too few rows for the samples asked).
    """
    import datasets.config

    reason = unreachable(repo_id, "dataset")
    offline_before = datasets.config.HF_HUB_OFFLINE  # read by datasets at import; HF_HUB_OFFLINE may be set later
    datasets.config.HF_HUB_OFFLINE = offline_before or reason is not None
    config = f" (config {name!r})" if name else ""
    try:
        try:
            return _load(repo_id, name, splits, revision, check, online=reason is None)
        except RuntimeError as e:
            if reason is not None or SCRIPT_REFUSED not in str(e) or revision not in (None, "main"):
                raise
            log.info("%s '%s': the repository holds a loading script, which datasets no longer runs; loading the "
                     "hub's parquet conversion (revision %s) instead", what, repo_id, PARQUET_BRANCH)
            return _load(repo_id, name, splits, PARQUET_BRANCH, check, online=True)
    except CheckFailed as e:
        raise ValueError(str(e)) from None
    except Exception as e:
        raise ValueError(_dataset_error(what, repo_id, config, reason, e)) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline_before


def _dataset_error(what, repo_id, config, reason, e) -> str:
    why = (f"could not reach the Hugging Face hub ({reason}) and it is not in the datasets cache"
           if reason is not None else f"could not be loaded: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return f"{what} '{repo_id}'{config}: {why}; give a save_to_disk folder instead"


def _load(repo_id: str, name, splits, revision, check, online: bool):
    """Load online (split by split when `splits` is given and the format allows) or from the caches."""
    import datasets

    manifest_path = _manifest_path(repo_id, name, splits, revision)
    if not online:
        if splits and manifest_path.is_file():
            return _load_files(repo_id, json.loads(manifest_path.read_text()), online=False)
        return datasets.load_dataset(repo_id, name, revision=revision)
    builder = datasets.load_dataset_builder(repo_id, name, revision=revision)  # the card and listings, no data
    sizes = {k: v.num_examples for k, v in (builder.info.splits or {}).items()} or None
    if check is not None:
        try:
            check(sizes, builder.info.features)
        except ValueError as e:
            raise CheckFailed(str(e)) from None
    files = builder.config.data_files or {}
    if not splits or builder.name not in SPLIT_FORMATS or not set(splits) <= set(files) or set(files) == set(splits):
        builder.download_and_prepare()
        return builder.as_dataset()
    manifest = {"builder": builder.name, "data_files": {}, "features": None, "revision": revision,
                "name": name}
    for split in splits:
        manifest["data_files"][split] = [str(f) for f in files[split]]
    if builder.info.features is not None:
        manifest["features"] = builder.info.features.to_dict()
    dd = _load_files(repo_id, manifest, online=True)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest))
    return dd


class CheckFailed(Exception):
    """A `check` of load_dataset refused the dataset from its card: its message goes to the user as is."""


def _load_files(repo_id: str, manifest: dict, online: bool):
    """The manifest's splits: their files fetched from the hub (or its cache) and read by datasets' builder."""
    import datasets
    from huggingface_hub import snapshot_download

    commit, relative = None, {}
    for split, urls in manifest["data_files"].items():
        for url in urls:  # hf://datasets/<repo>@<commit>/<path in repo>
            head, path = url.split("@", 1)[1].split("/", 1)
            commit = commit or unquote(head)
            relative.setdefault(split, []).append(path)
    folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=commit, local_files_only=not online,
                                    allow_patterns=[p for paths in relative.values() for p in paths]))
    features = datasets.Features.from_dict(manifest["features"]) if manifest["features"] else None
    return datasets.load_dataset(manifest["builder"], features=features,
                                 data_files={split: [str(folder / p) for p in paths] for split, paths in relative.items()})


def _manifest_path(repo_id: str, name, splits, revision) -> Path:
    """Where the split -> files manifest of one (repository, config, splits, revision) is kept."""
    import datasets.config

    key = json.dumps([repo_id, name, sorted(splits or []), revision])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(datasets.config.HF_DATASETS_CACHE) / "epmq_split_manifests" / f"{repo_id.replace('/', '--')}-{digest}.json"
