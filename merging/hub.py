"""Hub sources: what a config's hub id resolves to, checked without downloading weights, and every way the hub can
fail (gated, unknown repo or revision, no connection, offline cache miss) turned into one `HubError` line that
names the repo, the revision and what to do.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE once, at import (its `constants`), so this
module reads them from there at call time and never from the environment: both then agree on where the hub is.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from runstore.errors import UserError, describe

# The files a model needs (weights, config, tokenizer), as snapshot_download patterns: never README, images, ONNX.
PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja")
# Hugging Face user tokens start with hf_; any such string in a message is masked whatever its source.
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{6,}")


class HubError(UserError):
    """A hub source that cannot be had now: the line says which repo and revision, why, and what to do."""


def patterns(allow_pickle: bool) -> list[str]:
    return list(PATTERNS) + (["*.bin"] if allow_pickle else [])


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _redact(text: str) -> str:
    """`text` without the user's token (the configured one, and anything shaped like one)."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "***")
    return _TOKEN.sub("hf_***", text)


def explain(error: BaseException, repo_id: str, revision: str | None) -> str | None:
    """One line for a hub failure (None when `error` is not one): the repo and revision, what went wrong and what
    to do. Subclasses are tested before their bases (a gated repo is also a 'repository not found')."""
    import httpx2  # huggingface_hub's HTTP client (constraints.txt pins both)
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"hub model {repo_id!r} (revision {revision or 'main'})"
    login = "log in (`hf auth login`, or set HF_TOKEN)"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, GatedRepoError):
        reason = (f"gated repo, access refused (HTTP {status}): {login} with an account that has accepted its licence "
                  f"at {endpoint()}/{repo_id}")
    elif isinstance(error, RevisionNotFoundError):
        reason = "no such revision: check the branch, tag or commit in models[].revision"
    elif isinstance(error, RepositoryNotFoundError):
        reason = (f"no such repo on {endpoint()} (HTTP {status}), or it is private: check the id; for a private repo "
                  f"{login}")
    elif isinstance(error, RemoteEntryNotFoundError):
        reason = f"a file is missing from the repo (HTTP {status}): check that the id names a model repo"
    elif isinstance(error, IncompleteSnapshotError):
        reason = (f"the cached snapshot is incomplete ({describe(error)}): download it again online "
                  f"(`hf download {repo_id}`)")
    elif isinstance(error, (OfflineModeIsEnabled, LocalEntryNotFoundError)) and offline():
        reason = (f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1: go online (unset "
                  f"HF_HUB_OFFLINE) or pre-download it (`hf download {repo_id}"
                  f"{f' --revision {revision}' if revision else ''}`)")
    elif isinstance(error, HfHubHTTPError) and status == 401:
        reason = f"the hub refused the token (HTTP 401): {login} again, or unset a stale HF_TOKEN"
    elif isinstance(error, HfHubHTTPError):
        reason = f"the hub answered HTTP {status}: try again later, or pre-download it and set HF_HUB_OFFLINE=1"
    elif isinstance(error, (httpx2.HTTPError, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        cause = (error.__cause__ or error.__context__) if isinstance(error, LocalEntryNotFoundError) else error
        reason = (f"cannot reach the hub at {endpoint()} ({describe(cause or error)}): check the connection, or "
                  f"pre-download it (`hf download {repo_id}`) and set HF_HUB_OFFLINE=1")
    else:
        return None
    return _redact(f"{where}: {reason}")


@contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Any hub failure inside the block becomes a `HubError` (its stack is kept as the cause, shown with
    --verbose); other errors pass untouched."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        line = explain(error, repo_id, revision)
        if line is None:
            raise
        raise HubError(line) from error


def download(repo_id: str, revision: str | None, allow_pickle: bool = False) -> Path:
    """The snapshot folder of a hub model (config, weights, tokenizer): from the cache offline, else downloaded."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns(allow_pickle)))


def _remote_files(repo_id: str, revision: str | None) -> list[str]:
    """The repo's file names at `revision` (one metadata call), after checking that its config can be read: a
    gated repo's metadata is public, its files are not."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    with hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision)
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=revision))
    return [sibling.rfilename for sibling in info.siblings or []]


def hub_problems(repo_id: str, revision: str | None, allow_pickle: bool = False,
                 trust_remote_code: bool = False) -> list[str]:
    """What stops a run from using this hub model, found without downloading weights: offline, whether the cache
    holds a snapshot with config, weights and tokenizer; online, whether the repo and revision exist, its files
    are readable with the user's token, and it has config, weights and tokenizer files."""
    from merging.checkpoints import TOKENIZER_FILES, checkpoint_problems

    where = f"hub model {repo_id!r} (revision {revision or 'main'})"
    if offline():
        from huggingface_hub import snapshot_download

        try:
            with hub_errors(repo_id, revision):
                folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns(allow_pickle),
                                                local_files_only=True))
        except HubError as error:
            return error.lines()
        return [f"{where}: cached snapshot incomplete: {problem}; download it again online (`hf download {repo_id}`)"
                for problem in checkpoint_problems(folder, allow_pickle, trust_remote_code)]
    try:
        files = _remote_files(repo_id, revision)
    except HubError as error:
        return error.lines()
    weights = [f for f in files if f.endswith(".safetensors") or (allow_pickle and f.endswith(".bin"))]
    problems = [] if weights else [f"{where}: no safetensors weights in the repo"
                                   + ("" if allow_pickle else " (pickle .bin weights need allow_pickle: true)")]
    if not set(TOKENIZER_FILES) & set(files):
        problems.append(f"{where}: no tokenizer in the repo (none of {', '.join(TOKENIZER_FILES)})")
    return problems
