"""Hub models, tried as a user meets them: a real HTTP server on 127.0.0.1 stands in for the hub (HF_ENDPOINT) and
answers 401, 403 and 404 the way the hub does, or drops the connection; a Hugging Face cache laid out as the hub
writes it (models--org--name/{blobs,refs,snapshots}) serves offline runs, read-only.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import, so every online case runs the CLI in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config, write_tiny_config

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_NotARealTokenButShapedLikeOne123"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
PAIRS = [{"source": "bundled", "paradigms": ["subject_verb_agreement"], "pairs": 20}]  # a small probing workload


# --- a stand-in for the hub -----------------------------------------------------------------------------------------

class FakeHub(BaseHTTPRequestHandler):
    """The hub's answers for a few repos (status codes and X-Error-Code headers as huggingface.co sends them):
    hub/model exists (its metadata and config are served; listing its files drops the connection, as a network
    does mid-download), hub/gated is gated (401 without a token, 403 with one), hub/missing does not exist (401,
    as the hub answers for unknown and private repos alike), any revision but main (or its commit) is unknown
    (404), and every request about hub/dropped is dropped unanswered."""

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _error(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _drop(self) -> None:
        self.close_connection = True
        self.connection.close()

    def _json(self, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        parts = self.path.split("?")[0].strip("/").split("/")
        api = parts[0] == "api"
        repo = "/".join(parts[2:4] if api else parts[0:2])
        rest = parts[4:] if api else parts[2:]
        revision = rest[1] if rest[:1] in (["revision"], ["resolve"], ["tree"]) and len(rest) > 1 else "main"
        if repo == "hub/dropped":
            return self._drop()
        if repo == "hub/missing":
            return self._error(401, "RepoNotFound")
        if revision not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound")
        if api and rest[:1] == ["tree"]:
            return self._drop()
        if api:
            return self._json({"id": repo, "sha": COMMIT, "gated": "manual" if repo == "hub/gated" else False,
                               "siblings": [{"rfilename": name} for name in MODEL_FILES]})
        if repo == "hub/gated":
            return self._error(403 if self.headers.get("Authorization") else 401, "GatedRepo")
        body = tiny_config(320).to_json_string().encode()  # config.json: the only file any hub check reads
        self.send_response(200)
        etag = hashlib.sha1(body).hexdigest()
        for header, value in {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Content-Length": str(len(body))}.items():
            self.send_header(header, value)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)


@pytest.fixture(scope="module")
def hub_url():
    """The fake hub on a free port of the loopback interface; it stops after the module, or by itself after
    10 minutes whatever happens to the test process."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    deadline = threading.Timer(600, server.shutdown)
    deadline.daemon = True
    deadline.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    deadline.cancel()
    server.shutdown()
    server.server_close()


def _config(path: Path, models: dict[str, str | tuple[str, str]], **extra) -> Path:
    specs = [{"name": name, "source": source} if isinstance(source, str)
             else {"name": name, "source": source[0], "revision": source[1]} for name, source in models.items()]
    path.write_text(yaml.safe_dump({"name": "hub", "device": "cpu", "base": next(iter(models)), "models": specs,
                                    **extra}, sort_keys=False))
    return path


def _cli(*args: str, cwd: Path, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PREFECT_"))}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=base | {"PYTHONPATH": str(ROOT), "HF_HOME": str(cwd / "hf"),
                                                       "PREFECT_HOME": str(cwd / "prefect"), **env})


def _one_error(done: subprocess.CompletedProcess) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and TOKEN not in output and TOKEN[3:] not in output, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]


# --- online: validate checks the repo's metadata; every failure is one line ---------------------------------------

ONLINE = [
    ("hub/missing", None, True, r"hub model 'hub/missing' \(revision main\): no such repo on http://127\.0\.0\.1:\d+ "
                                r"\(HTTP 401\), or it is private: check the id; for a private repo log in"),
    ("hub/gated", None, False, r"hub model 'hub/gated' \(revision main\): gated repo, access refused \(HTTP 401\): "
                               r"log in .* accepted its licence at http://127\.0\.0\.1:\d+/hub/gated"),
    ("hub/gated", None, True, r"hub model 'hub/gated' \(revision main\): gated repo, access refused \(HTTP 403\)"),
    ("hub/model", "v9", True, r"hub model 'hub/model' \(revision v9\): no such revision: check the branch, tag or "
                              r"commit in models\[\]\.revision"),
    ("hub/dropped", None, True, r"hub model 'hub/dropped' \(revision main\): cannot reach the hub at "
                                r"http://127\.0\.0\.1:\d+ \(.*\): check the connection, or pre-download it"),
]


@pytest.mark.parametrize("repo, revision, token, expected", ONLINE,
                         ids=["401-missing", "401-gated", "403-gated", "404-revision", "dropped"])
def test_validate_online_names_repo_revision_and_remedy(hub_url, tmp_path, repo, revision, token, expected):
    import re

    config = _config(tmp_path / "c.yaml", {"base": (repo, revision) if revision else repo})
    done = _cli("validate", str(config), cwd=tmp_path, HF_ENDPOINT=hub_url, HF_HUB_OFFLINE="0",
                **({"HF_TOKEN": TOKEN} if token else {}))
    line = _one_error(done)
    assert line.startswith(f"error: {config}: models[0].source: ") and re.search(expected, line), line


def test_validate_online_passes_a_readable_repo(hub_url, tmp_path):
    config = _config(tmp_path / "c.yaml", {"base": "hub/model"}, minimal_pairs=PAIRS)
    done = _cli("validate", str(config), cwd=tmp_path, HF_ENDPOINT=hub_url, HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr


def test_run_turns_a_failure_during_download_into_one_line(hub_url, tmp_path):
    """hub/model passes validate (metadata and config readable), then the connection drops while the run lists
    its files to download them, inside the Prefect flow: one line, exit 2, no traceback, no token, no run dir."""
    config = _config(tmp_path / "c.yaml", {"base": "hub/model"}, minimal_pairs=PAIRS)
    run = tmp_path / "run"
    done = _cli("run", str(config), "--run-dir", str(run), cwd=tmp_path, timeout=600, HF_ENDPOINT=hub_url,
                HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN)
    line = _one_error(done)
    assert line.startswith("error: hub model 'hub/model' (revision main): cannot reach the hub at http://127.0.0.1:")
    assert "check the connection, or pre-download it" in line
    assert not run.exists()


# --- offline: a cache laid out as the hub writes it ---------------------------------------------------------------

def _blob_name(path: Path) -> str:
    """The hub cache's blob name: sha256 of an LFS file (weights), the git blob sha1 of a small file."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, skip: tuple[str, ...] = ()) -> Path:
    """`folder` laid out in `cache` as huggingface_hub stores `repo_id` at `commit` (refs/main, blobs named by
    content, snapshot files as relative links to them); returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in skip:
            blob = repo / "blobs" / _blob_name(path)
            shutil.copyfile(path, blob)
            (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot


def _listing(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: kind, mode, link target or content hash (what "unchanged" means)."""
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            out[str(path.relative_to(root))] = ("link", stat.S_IMODE(info.st_mode), os.readlink(path))
        elif path.is_dir():
            out[str(path.relative_to(root))] = ("dir", stat.S_IMODE(info.st_mode))
        else:
            out[str(path.relative_to(root))] = ("file", stat.S_IMODE(info.st_mode), info.st_mtime_ns,
                                                hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def cache(tiny_family, tmp_path_factory) -> Path:
    """The tiny family as a read-only hub cache (tiny/base, tiny/a, tiny/b) and tiny/broken, a snapshot without
    its weights."""
    root = tmp_path_factory.mktemp("hf-cache")
    for name, folder in tiny_family.items():
        hub_cache(root, f"tiny/{name}", folder)
    hub_cache(root, "tiny/broken", tiny_family["base"], skip=("model.safetensors",))
    subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
    yield root
    subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)


def test_validate_offline_names_a_missing_repo_and_a_snapshot_without_weights(cache, tmp_path):
    config = _config(tmp_path / "c.yaml", {"base": "tiny/base", "gone": "nobody/missing-model",
                                           "broken": "tiny/broken"}, minimal_pairs=PAIRS)
    done = _cli("validate", str(config), cwd=tmp_path, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {config}: models[1].source: hub model 'nobody/missing-model' (revision main): not in the Hugging "
        f"Face cache ({cache}) and HF_HUB_OFFLINE=1: go online (unset HF_HUB_OFFLINE) or pre-download it "
        f"(`hf download nobody/missing-model`)",
        f"error: {config}: models[2].source: hub model 'tiny/broken' (revision main): cached snapshot incomplete: "
        f"{cache}/models--tiny--broken/snapshots/{COMMIT}: no safetensors weights found; download it again online "
        f"(`hf download tiny/broken`)"]


def test_hub_snapshot_digest_is_its_blobs_and_writes_nothing(tiny_family, tmp_path, monkeypatch):
    """Same blobs, same digest (whatever the commit or repo), without reading the weights; another blob, another
    digest. A plain folder's digest is memoised in the run's cache, never beside the model."""
    from merging import checkpoints
    from merging.checkpoints import content_digest
    from runstore.cache import DIGEST_MEMOS

    first = hub_cache(tmp_path / "cache", "tiny/a", tiny_family["a"])
    again = hub_cache(tmp_path / "cache", "other/a", tiny_family["a"], commit="f" * 40)
    other = hub_cache(tmp_path / "cache", "tiny/b", tiny_family["b"])
    before = _listing(tmp_path / "cache")
    monkeypatch.setattr(checkpoints, "files_digest", lambda files: pytest.fail("a hub snapshot's bytes were read"))
    assert content_digest(first) == content_digest(again) != content_digest(other)
    monkeypatch.undo()
    assert _listing(tmp_path / "cache") == before
    plain = Path(shutil.copytree(tiny_family["a"], tmp_path / "plain"))
    folder_before = _listing(plain)
    digest = content_digest(plain, memo_dir=tmp_path / "run-cache")
    assert _listing(plain) == folder_before, "nothing is written beside the model"
    memos = list((tmp_path / "run-cache" / DIGEST_MEMOS).glob("*.json"))
    assert len(memos) == 1 and json.loads(memos[0].read_text())["digest"] == digest
    checkpoints._DIGESTS.clear()
    monkeypatch.setattr(checkpoints, "files_digest", lambda files: pytest.fail("the memo was not used"))
    assert content_digest(plain, memo_dir=tmp_path / "run-cache") == digest


def test_run_on_a_read_only_hub_cache_leaves_it_unchanged(cache, tmp_path):
    """The whole pipeline offline on hub ids, from a read-only cache; as root could write anyway, the cache's
    full listing (links, modes, bytes, mtimes) is compared before and after."""
    before = _listing(cache)
    config = write_tiny_config(tmp_path / "tiny.yaml", {name: f"tiny/{name}" for name in ("base", "a", "b")})
    run = tmp_path / "run"
    done = _cli("run", str(config), "--run-dir", str(run), cwd=tmp_path, timeout=900, HF_HUB_CACHE=str(cache),
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (run / "tables" / "probes.parquet").is_file() and (run / "report" / "index.html").is_file()
    assert _listing(cache) == before
    assert list((run / "cache" / "digests").glob("*.json")), "the merge's digest memo lives in the run's cache"
