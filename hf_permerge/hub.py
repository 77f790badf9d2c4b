"""Push output folders to the Hugging Face Hub and pull them back, with errors that name the cause.

Everything goes through the real `huggingface_hub` client, so `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_HOME`
and the stored login behave as users expect. The token comes from the usual places (the `token`
argument, then `HF_TOKEN`, then `hf auth login`'s stored token) and is never printed, logged or
written: error messages are scrubbed of it as a last line of defence.

A push is one commit of a whole folder. The folder is read, never written: a failed push leaves the
local artefacts exactly as they were.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, errors, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import get_token, validate_repo_id

logger = logging.getLogger(__name__)

LOGIN_HINT = "pass token=..., set HF_TOKEN to a token with {access} access, or run `hf auth login`"
"""How to give a token; `cli_message` puts it in the words of the command line (`--token`)."""
LOCAL_REPO_PLACEHOLDER = "path/to/this/folder"
"""Where a model card saved locally loads the model from; `push_folder_to_hub` puts the repo id there."""
NETWORK_HINT = (
    "check your network connection, or set HF_ENDPOINT to a reachable Hub-compatible endpoint "
    "(the current one is {endpoint})"
)


class HubError(RuntimeError):
    """A Hub operation failed; `reason` is one of `invalid_folder`, `invalid_repo_id`, `no_token`, `unauthorized`,
    `forbidden`, `not_found`, `revision_not_found`, `unreachable`, `offline`, `http`."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or constants.ENDPOINT).rstrip("/")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception types of whichever HTTP library this `huggingface_hub` uses."""
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            classes.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def _translate(err: BaseException, action: str, token: str | None, endpoint: str | None, access: str) -> HubError:
    """Map an exception from `huggingface_hub` to a HubError whose message names the cause and the fix;
    `access` ("read" or "write") is what the token needs."""
    endpoint = _endpoint(endpoint)
    hint = LOGIN_HINT.format(access=access)
    for e in _chain(err):
        if isinstance(e, errors.OfflineModeIsEnabled):
            return HubError(
                f"cannot {action}: offline mode is on (HF_HUB_OFFLINE=1) and the files are not in the "
                "local cache; unset HF_HUB_OFFLINE to reach the Hub",
                "offline",
            )
        if isinstance(e, errors.LocalTokenNotFoundError):
            return HubError(f"cannot {action}: no Hugging Face token found; {hint}", "no_token")
        if isinstance(e, errors.RevisionNotFoundError):
            return HubError(
                f"cannot {action}: that revision does not exist in the repo (check the branch, tag or commit name)",
                "revision_not_found",
            )
        if isinstance(e, errors.RepositoryNotFoundError):
            return HubError(
                f"cannot {action}: repository not found at {endpoint} (check the repo id; if it is "
                f"private, make sure your token can read it: {LOGIN_HINT.format(access='read')})",
                "not_found",
            )
        if isinstance(e, errors.HfHubHTTPError) and e.response is not None:
            status = e.response.status_code
            if status == 401:
                return HubError(
                    f"cannot {action}: the Hub rejected the token (401 Unauthorized: invalid or expired token); {hint}",
                    "unauthorized",
                )
            if status == 403:
                return HubError(
                    f"cannot {action}: the token lacks permission (403 Forbidden); use a token with "
                    f"{access} access to that repo",
                    "forbidden",
                )
            return HubError(_scrub(f"cannot {action}: the Hub answered HTTP {status}: {e}", token), "http")
        if isinstance(e, _transport_errors()):
            return HubError(
                f"cannot {action}: the Hub endpoint {endpoint} is unreachable "
                f"({type(e).__name__}: {_scrub(str(e), token)}); " + NETWORK_HINT.format(endpoint=endpoint),
                "unreachable",
            )
    return HubError(_scrub(f"cannot {action}: {type(err).__name__}: {err}", token), "http")


def _hub_call(action: str, secret: str | None, endpoint: str | None, fn, /, *args, access: str = "write", **kwargs):
    """Run one `huggingface_hub` call; any failure becomes a HubError naming the cause (never the token)."""
    try:
        return fn(*args, **kwargs)
    except HubError:
        raise
    except Exception as err:
        translated = _translate(err, action, secret, endpoint, access)
        raise translated from err


def cli_message(err: BaseException) -> str:
    """An error in the words of the command line (`--token` where Python says `token=...`), also when a Hub
    error was folded into another (a mistyped local path that is no Hub repo either)."""
    return (
        str(err)
        .replace("pass token=...", "pass --token")
        .replace("allow_different_tokenizers=True", "--allow-different-tokenizers")
    )


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed repo id before any network call (`name` or `namespace/name`)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(
            f"{repo_id!r} is not a valid Hub repo id: use `name` or `namespace/name`, made of letters, "
            "digits, '-', '_' and '.' (not starting or ending with '-' or '.', at most 96 characters), "
            "e.g. alice/fmnist-merged",
            "invalid_repo_id",
        ) from None


# ---- folders -------------------------------------------------------------------------------------------


def folder_kind(folder: str | os.PathLike) -> str:
    """ "model" (config.json + model.safetensors) or "pair" (pair.json); a HubError says what is missing."""
    path = Path(folder)
    if not path.is_dir():
        raise HubError(
            f"{path} is not a directory; pass the output folder of a merge or a training run", "invalid_folder"
        )
    if (path / "pair.json").is_file():
        try:
            json.loads((path / "pair.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HubError(
                f"{path / 'pair.json'} is not valid JSON ({err}); re-create the pair folder", "invalid_folder"
            ) from None
        return "pair"
    weights = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards and their index
    missing = [name for name in ("config.json", weights[0]) if not (path / name).is_file()]
    if missing == [weights[0]] and (path / weights[1]).is_file():
        missing = []
    if missing:
        merged = path / "merged"  # a report or run folder: its merged model is what is pushed
        inside = f"; the model inside it is {merged}" if (merged / "config.json").is_file() else ""
        raise HubError(
            f"{path} is neither a model folder nor a pair folder: it lacks {', '.join(missing)} (a model "
            "folder has config.json and model.safetensors, as written by save_pretrained; a pair folder "
            f"has pair.json){inside}",
            "invalid_folder",
        )
    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HubError(f"{path / 'config.json'} is not valid JSON ({err})", "invalid_folder") from None
    return "model"


def files_to_push(folder: str | os.PathLike) -> list[str]:
    """Relative paths (posix, sorted) of the files a push uploads: everything but hidden entries and caches."""
    root = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith((".pyc", ".lock", ".incomplete")):
                continue
            out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(out)


# ---- push / pull ---------------------------------------------------------------------------------------


def _card_for_repo(path: Path, repo_id: str) -> str | bytes:
    """A card saved before its repo was known loads the model from a placeholder path: the pushed copy loads it
    from `repo_id` (the local file is left as it is)."""
    text = path.read_text(encoding="utf-8")
    return (
        text.replace(LOCAL_REPO_PLACEHOLDER, repo_id).encode("utf-8") if LOCAL_REPO_PLACEHOLDER in text else str(path)
    )


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
):
    """Upload a whole output folder to a model repo in one commit, creating the repo (and branch) if missing.

    `folder` is a merged-model folder (config.json + model.safetensors, plus whatever else is there:
    permutations, report.json, plots, README.md, preprocessor_config.json) or a pair folder (pair.json +
    net_*/...). `repo_id` may omit the namespace (the token's user is used). Returns the
    `huggingface_hub.CommitInfo` (a `str` equal to the commit URL; `.pr_url` when `create_pr`).
    `endpoint` defaults to `HF_ENDPOINT` (read when `huggingface_hub` is imported), else huggingface.co.
    Raises `HubError` naming the cause (bad folder, no/bad token, unreachable endpoint, ...).
    """
    check_repo_id(repo_id)
    kind = folder_kind(folder)
    paths = files_to_push(folder)
    token = token or get_token()
    if not token:
        raise HubError(
            f"cannot push to {repo_id}: no Hugging Face token found; {LOGIN_HINT.format(access='write')}", "no_token"
        )
    api = HfApi(token=token, endpoint=endpoint)
    user = _hub_call(f"push to {repo_id}", token, endpoint, api.whoami)["name"]
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
    action = f"push {folder} to {repo_id}"
    _hub_call(action, token, endpoint, api.create_repo, repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and not _hub_call(action, token, endpoint, api.revision_exists, repo_id, revision):
        _hub_call(action, token, endpoint, api.create_branch, repo_id, branch=revision, exist_ok=True)
    operations = [
        CommitOperationAdd(
            path_in_repo=p,
            path_or_fileobj=_card_for_repo(Path(folder) / p, repo_id) if p == "README.md" else str(Path(folder) / p),
        )
        for p in paths
    ]
    message = commit_message or f"Upload {kind} folder with hf_permerge"
    logger.info("pushing %d files from %s to %s (one commit)", len(operations), folder, repo_id)
    return _hub_call(
        action,
        token,
        endpoint,
        api.create_commit,
        repo_id,
        operations,
        commit_message=message,
        revision=revision,
        create_pr=create_pr,
    )


def download_from_hub(
    repo_id: str,
    revision: str | None = None,
    allow_patterns=None,
    *,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
) -> str:
    """Download a repo snapshot (or the files matching `allow_patterns`) into the HF cache; returns its local dir.

    Raises `HubError` naming the cause (repo or revision not found, bad token, unreachable, offline).
    """
    return _hub_call(
        f"download {repo_id}",
        token,
        endpoint,
        snapshot_download,
        repo_id,
        revision=revision,
        allow_patterns=allow_patterns,
        token=token,
        cache_dir=cache_dir,
        endpoint=endpoint,
        access="read",
    )


def resolve_local_or_hub(
    path_or_repo_id: str | os.PathLike, revision: str | None = None, allow_patterns=None, *, token: str | None = None
) -> str:
    """A local directory for `path_or_repo_id`: an existing directory wins, otherwise it is a Hub repo id
    (downloaded at `revision`, with `token` if given, else HF_TOKEN or the stored login)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return str(path)
    name = str(path_or_repo_id)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise HubError(
            f"{name!r} is neither a local directory nor a Hub repo id (namespace/name)", "not_found"
        ) from None
    try:
        return download_from_hub(name, revision=revision, allow_patterns=allow_patterns, token=token)
    except HubError as err:
        if err.reason == "not_found":
            raise HubError(f"there is no local directory {name!r}, and {err}", "not_found") from None
        raise
