"""A local Hugging Face hub for tests: huggingface_hub and datasets run their online code paths against it.

Repositories are folders, one per revision: ``<root>/<type>s/<owner>/<name>/<revision>/<files>`` with type
``model`` or ``dataset``; a revision with slashes (the parquet conversion branch ``refs/convert/parquet``) is
stored URL-encoded (``refs%2Fconvert%2Fparquet``). ``HubServer.add_repo`` writes them.

Endpoints (requests may name a revision raw, URL-encoded or by its commit sha):

- ``GET  /api/{models,datasets}/<repo>[/revision/<rev>]``  repo info: id, sha, siblings
- ``GET  /api/<type>s/<repo>/tree/<rev>[/<path>]``          listing (``recursive``; ``expand`` adds lastCommit)
- ``POST /api/<type>s/<repo>/paths-info/<rev>``             the entries of the form's ``paths``
- ``GET  /api/<type>s/<repo>/refs``                         branches and parquet conversions
- ``GET|HEAD /<repo>/resolve/<rev>/<path>`` (models), ``/datasets/<repo>/resolve/<rev>/<path>`` (datasets):
  the file with ETag, X-Repo-Commit and Content-Length; ``Range: bytes=`` answers 206

Misses answer 404 with the ``X-Error-Code`` huggingface_hub turns into its errors (RepoNotFound,
RevisionNotFound, EntryNotFound). Files are served plain, never with xet headers, so the clients download
over HTTP. Every request is logged as (method, path with query) for tests to assert on.

``serve(tmp_path, monkeypatch)`` runs one for a test, with both libraries pointed at it and their caches in
tmp_path; the ``hub_server`` fixture of tests/conftest.py wraps it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import yaml

# What the hub stores with git LFS: tree entries get an "lfs" field and the ETag is the sha256, as on the hub.
LFS_SUFFIXES = {".bin", ".safetensors", ".parquet", ".pt", ".pth", ".ckpt", ".arrow", ".npz", ".onnx", ".zip"}
FAKE_DATE = "2024-01-01T00:00:00.000Z"


def commit_sha(repo_type: str, repo_id: str, revision: str) -> str:
    """The fixed fake commit of a revision (a revision is one commit here)."""
    return hashlib.sha1(f"{repo_type}s/{repo_id}@{revision}".encode()).hexdigest()


class HubError(Exception):
    def __init__(self, code: str, message: str, commit: str | None = None):
        super().__init__(message)
        self.code, self.commit = code, commit


class HubServer:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # a short poll interval: shutdown() waits for one poll
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    # --- life and test API ---

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_repo(self, repo_id: str, files: dict[str, bytes | str | Path], repo_type: str = "model",
                 revision: str = "main") -> Path:
        """Write one revision of a repository: files maps a path in the repo to bytes, text or a file to copy."""
        folder = self.root / f"{repo_type}s" / repo_id / quote(revision, safe="")
        for path, content in files.items():
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                content = content.read_bytes()
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        return folder

    def sha(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> str:
        return commit_sha(repo_type, repo_id, revision)

    def requested(self, substring: str = "", method: str | None = None) -> list[tuple[str, str]]:
        """The logged requests whose path (with query) contains substring, optionally of one method."""
        with self._lock:
            return [(m, p) for m, p in self.log if substring in p and method in (None, m)]

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.log.append((method, path))

    # --- repository model ---

    def repo_folder(self, repo_type: str, repo_id: str) -> Path:
        folder = self.root / f"{repo_type}s" / repo_id
        if repo_id.count("/") != 1 or not folder.is_dir():
            raise HubError("RepoNotFound", f"Repository {repo_id} not found")
        return folder

    def revisions(self, repo_type: str, repo_id: str) -> dict[str, Path]:
        return {unquote(p.name): p for p in self.repo_folder(repo_type, repo_id).iterdir() if p.is_dir()}

    def split_revision(self, repo_type: str, repo_id: str, parts: list[str]) -> tuple[str, Path, list[str]]:
        """(revision, its folder, the remaining path parts) of parts that start with a revision.

        The clients URL-encode a revision ("refs%2Fconvert%2Fparquet" is one part), but a raw
        "refs/convert/parquet" spans several parts: take the longest prefix that names a revision or its sha.
        """
        revisions = self.revisions(repo_type, repo_id)
        by_sha = {commit_sha(repo_type, repo_id, r): r for r in revisions}
        for n in range(len(parts), 0, -1):
            name = "/".join(parts[:n])
            name = by_sha.get(name, name)
            if name in revisions:
                return name, revisions[name], parts[n:]
        raise HubError("RevisionNotFound", f"Invalid rev id: {parts[0] if parts else ''}")

    def files(self, folder: Path) -> list[str]:
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def entry(self, folder: Path, path: str, commit: str, expand: bool = False) -> dict:
        """A tree entry as the hub's tree and paths-info endpoints write it."""
        target = folder / path
        if target.is_dir():
            entry = {"type": "directory", "oid": hashlib.sha1(f"tree {path}".encode()).hexdigest(), "size": 0,
                     "path": path}
        else:
            data = target.read_bytes()
            entry = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}
            if target.suffix in LFS_SUFFIXES:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        if expand:
            entry["lastCommit"] = {"id": commit, "title": "Upload", "date": FAKE_DATE}
        return entry


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag(path: Path, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if path.suffix in LFS_SUFFIXES else git_blob_sha(data)


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[0].lower() in ("1", "true")


class _Handler(BaseHTTPRequestHandler):
    server_version = "epmq-test-hub"

    def log_message(self, *args):  # keep pytest output clean; the hub keeps its own log
        pass

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_POST(self):
        self._serve("POST")

    def _serve(self, method: str) -> None:
        hub: HubServer = self.server.hub
        hub._record(method, self.path)
        url = urlsplit(self.path)
        # split before unquoting, so that an encoded revision ("refs%2Fconvert%2Fparquet") stays one part
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        try:
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
                repo_type, repo_id, rest = parts[1][:-1], "/".join(parts[2:4]), parts[4:]
                self._api(method, hub, repo_type, repo_id, rest, query)
            elif "resolve" in parts[:4] and method in ("GET", "HEAD"):
                repo_type = "dataset" if parts[0] == "datasets" else "model"
                parts = parts[1:] if repo_type == "dataset" else parts
                if parts[2:3] != ["resolve"]:
                    raise HubError("RepoNotFound", "Repository not found")
                self._resolve(method, hub, repo_type, "/".join(parts[:2]), parts[3:])
            else:
                self._json({"error": "Not found"}, status=404)
        except HubError as e:
            headers = {"X-Error-Code": e.code, "X-Error-Message": str(e)}
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._json({"error": str(e)}, status=404, headers=headers, body=method != "HEAD")

    def _api(self, method, hub, repo_type, repo_id, rest, query):
        hub.repo_folder(repo_type, repo_id)
        if not rest or rest[0] == "revision":
            revision, folder, _ = hub.split_revision(repo_type, repo_id, rest[1:] or ["main"])
            sha = commit_sha(repo_type, repo_id, revision)
            siblings = []
            for path in hub.files(folder):
                sibling = {"rfilename": path}
                if _flag(query, "blobs"):  # files_metadata=True
                    entry = hub.entry(folder, path, sha)
                    sibling.update(size=entry["size"], blobId=entry["oid"])
                    if "lfs" in entry:
                        sibling["lfs"] = {"size": entry["size"], "sha256": entry["lfs"]["oid"], "pointerSize": 134}
                siblings.append(sibling)
            return self._json({"id": repo_id, "author": repo_id.split("/")[0], "sha": sha, "private": False,
                               "gated": False, "disabled": False, "lastModified": FAKE_DATE, "siblings": siblings})
        if rest[0] == "refs":
            refs = {"branches": [], "converts": [], "tags": [], "pullRequests": []}
            for revision in hub.revisions(repo_type, repo_id):
                kind = "converts" if revision.startswith("refs/convert/") else "branches"
                ref = revision if revision.startswith("refs/") else f"refs/heads/{revision}"
                refs[kind].append({"name": revision.rsplit("/", 1)[-1], "ref": ref,
                                   "targetCommit": commit_sha(repo_type, repo_id, revision)})
            return self._json(refs)
        if rest[0] == "tree" and method == "GET":
            revision, folder, path = hub.split_revision(repo_type, repo_id, rest[1:])
            sha, path = commit_sha(repo_type, repo_id, revision), "/".join(path)
            base = folder / path
            if not base.is_dir():
                raise HubError("EntryNotFound", f"{path} does not exist on {revision}", commit=sha)
            children = base.rglob("*") if _flag(query, "recursive") else base.iterdir()
            entries = [hub.entry(folder, p.relative_to(folder).as_posix(), sha, _flag(query, "expand"))
                       for p in sorted(children)]
            return self._json(entries)
        if rest[0] == "paths-info" and method == "POST":
            revision, folder, _ = hub.split_revision(repo_type, repo_id, rest[1:])
            sha = commit_sha(repo_type, repo_id, revision)
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            paths = [p.strip("/") for p in form.get("paths", [])]
            return self._json([hub.entry(folder, p, sha, _flag(form, "expand")) for p in paths
                               if (folder / p).exists()])
        self._json({"error": "Not found"}, status=404)

    def _resolve(self, method, hub, repo_type, repo_id, rest):
        hub.repo_folder(repo_type, repo_id)
        revision, folder, path = hub.split_revision(repo_type, repo_id, rest)
        sha = commit_sha(repo_type, repo_id, revision)
        target = folder / "/".join(path)
        if not path or not target.is_file():
            raise HubError("EntryNotFound", f"{'/'.join(path)} does not exist on {revision}", commit=sha)
        data = target.read_bytes()
        headers = {"ETag": f'"{etag(target, data)}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match:  # HfFileSystem reads parquet footers and resumes downloads with ranges
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            else:  # suffix range: the last N bytes
                start, end = max(len(data) - int(last or 0), 0), len(data) - 1
            if start >= len(data) or start > end:
                headers["Content-Range"] = f"bytes */{len(data)}"
                return self._send(416, b"", headers)
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, body, headers, send_body=method != "HEAD")

    def _json(self, payload, status=200, headers=None, body=True):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})},
                   send_body=body)

    def _send(self, status, body: bytes, headers: dict, send_body: bool = True) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


@contextmanager
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running HubServer on tmp_path/hub, with huggingface_hub and datasets pointed at it and their caches
    in tmp_path/hf-home; monkeypatch undoes the settings, the server stops on leaving.

    Both libraries read their settings into module constants at import, so the constants are patched as well
    as the environment (which covers what is imported later, and subprocesses).
    """
    import datasets.config
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf-home"
    with HubServer(tmp_path / "hub") as server:
        env = {"HF_ENDPOINT": server.url, "HF_HOME": home, "HF_HUB_CACHE": home / "hub",
               "HF_DATASETS_CACHE": home / "datasets", "HF_XET_CACHE": home / "xet",
               "HF_HUB_DISABLE_XET": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        # online, and no real token sent anywhere
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
                    "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(key, raising=False)

        patch = monkeypatch.setattr
        patch(hf_constants, "ENDPOINT", server.url)
        patch(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        patch(hf_constants, "HF_URL_HOSTS", hf_constants.HF_URL_HOSTS | {"127.0.0.1"})  # derived from ENDPOINT too
        patch(hf_constants, "HF_HOME", str(home))
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            patch(hf_constants, name, str(home / "hub"))
        for name in ("HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE"):
            patch(hf_constants, name, str(home / "assets"))
        patch(hf_constants, "HF_XET_CACHE", str(home / "xet"))
        patch(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
        patch(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        # asked of the hub once per process (GET /api/agent-harnesses, a 404 here); a registry would be kept here
        patch(hf_constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
        patch(hf_constants, "HF_HUB_OFFLINE", False)
        patch(hf_constants, "HF_HUB_DISABLE_XET", True)

        patch(datasets.config, "HF_ENDPOINT", server.url)
        patch(datasets.config, "HUB_DATASETS_URL", server.url + "/datasets/{repo_id}/resolve/{revision}/{path}")
        patch(datasets.config, "HF_HUB_OFFLINE", False)
        patch(datasets.config, "HF_DATASETS_OFFLINE", False)
        patch(datasets.config, "HF_CACHE_HOME", str(home))
        patch(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
        patch(datasets.config, "HF_MODULES_CACHE", home / "modules")
        patch(datasets.config, "DOWNLOADED_DATASETS_PATH", home / "datasets" / "downloads")
        patch(datasets.config, "EXTRACTED_DATASETS_PATH", home / "datasets" / "downloads" / "extracted")
        # two calls that leave the hub: a HEAD to S3 that counts downloads, and the dataset viewer's exported
        # infos, asked of "datasets-server.<endpoint host>", which a local server cannot be
        patch(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
        patch(datasets.config, "USE_PARQUET_EXPORT", False)
        yield server


def dataset_card(configs: dict, layout: str) -> str:
    """A dataset card as the hub's parquet repositories have it: features, split sizes and data files per
    config (layout: where a config's split files are, e.g. "data/{split}-*")."""
    meta = {"dataset_info": [], "configs": []}
    for name, dd in configs.items():
        first = next(iter(dd.values()))
        meta["dataset_info"].append({"config_name": name, "features": first.features._to_yaml_list(),
                                     "splits": [{"name": s, "num_bytes": 1000, "num_examples": len(ds)}
                                                for s, ds in dd.items()]})
        meta["configs"].append({"config_name": name, "data_files": [
            {"split": s, "path": layout.format(config=name, split=s)} for s in dd]})
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def parquet_files(dd, tmp: Path, layout: str) -> dict[str, bytes]:
    """split path (layout with {split}) -> the split written as a parquet file, for add_repo."""
    out = {}
    for split, ds in dd.items():
        path = tmp / f"{split}.parquet"
        ds.to_parquet(str(path))
        out[layout.format(split=split)] = path.read_bytes()
    return out
