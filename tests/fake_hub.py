"""A Hub-compatible HTTP endpoint for tests: the slice of huggingface.co that `huggingface_hub` calls.

The client under test is the real `huggingface_hub` (and `transformers` on top of it), pointed here with
`HF_ENDPOINT`. Only model repos, and only what creating a repo, pushing one commit and downloading need:

    GET  /api/whoami-v2                                   token check (401 on a bad token)
    POST /api/repos/create                                create a model repo (private flag; 409 if it exists)
    POST /api/validate-yaml                               README metadata check before a commit
    POST /api/models/{repo}/preupload/{rev}               upload mode per file: always "regular" (no LFS/Xet)
    POST /api/models/{repo}/commit/{rev}[?create_pr=1]    the NDJSON commit (base64 files, deletions)
    POST /api/models/{repo}/branch/{branch}               create a branch
    GET  /api/models/{repo}[/revision/{rev}]              repo info with `sha` and `siblings`
    GET  /api/models/{repo}/tree/{rev}[/{path}]           file listing (`recursive`)
    HEAD|GET /{repo}/resolve/{rev}/{path}                 files, with ETag, X-Repo-Commit, Content-Length

Errors carry the headers the client maps to its exception types (`X-Error-Code: RepoNotFound`,
`RevisionNotFound`, `EntryNotFound`; `X-Error-Message` on a bad token). Everything lives in memory.
Run it by hand with `python tests/fake_hub.py --port 8000 --token hf_xxx:alice`.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

BAD_CREDENTIALS = "Invalid credentials in Authorization header"  # the Hub's wording, which the client matches
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file: what the Hub serves as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    parent: str | None
    summary: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1" -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: int = 0

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if len(revision) == 40 and revision in self.commits:
            return self.commits[revision]
        return None


class HubError(Exception):
    """An error response: status, message and the `X-Error-Code` the client maps to an exception."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


class FakeHub:
    """An in-memory Hub on 127.0.0.1 (a free port), served from a daemon thread.

    `tokens` maps each valid token to its user name; any other bearer token gets a 401 on every route,
    as on huggingface.co. `orgs` maps a user to the organisations it may write to.
    """

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None, port: int = 0):
        self.tokens = dict(tokens or {})
        self.orgs = dict(orgs or {})
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status); never headers or tokens
        self.unrouted: list[tuple[str, str]] = []  # calls the client made that this endpoint does not implement
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- state -------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision (for assertions)."""
        commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id} has no revision {revision!r}")
        return dict(commit.files)

    def _new_commit(self, repo: Repo, files: dict[str, bytes], parent: str | None, summary: str) -> Commit:
        h = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{summary}\0{next(self._counter)}".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        commit = Commit(h.hexdigest(), files, parent, summary)
        repo.commits[commit.sha] = commit
        return commit

    # ---- auth --------------------------------------------------------------------------------
    def user_for(self, authorization: str | None) -> str | None:
        """The user a request acts as; None when anonymous. A bad token is a 401, whatever the route."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token not in self.tokens:
            raise HubError(401, BAD_CREDENTIALS, headers={"X-Error-Message": BAD_CREDENTIALS})
        return self.tokens[token]

    def _readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._may_write(repo_id, user)):
            # The Hub hides private repos: 401 to anonymous callers, 404 to other users.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _may_write(self, repo_id: str, user: str | None) -> bool:
        namespace = repo_id.split("/")[0]
        return user is not None and (namespace == user or namespace in self.orgs.get(user, []))

    def _writable(self, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repo", "RepoNotFound")
        repo = self._readable(repo_id, user)
        if not self._may_write(repo_id, user):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ---- routes ------------------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, query: dict, headers, body: bytes):
        """Dispatch one request; returns (status, headers, body bytes)."""
        user = self.user_for(headers.get("Authorization"))
        seg = raw_path.strip("/").split("/")
        with self._lock:
            if seg[:2] == ["api", "whoami-v2"] and method == "GET":
                if user is None:
                    raise HubError(401, "Invalid username or password.")
                return _json(
                    {
                        "type": "user",
                        "id": hashlib.md5(user.encode()).hexdigest()[:24],
                        "name": user,
                        "fullname": user,
                        "orgs": [{"name": o} for o in self.orgs.get(user, [])],
                        "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
                    }
                )
            if seg[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create_repo(user, json.loads(body or b"{}"))
            if seg[:2] == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml(json.loads(body or b"{}"))
            if seg[:2] == ["api", "models"] and len(seg) >= 4:
                repo_id = f"{unquote(seg[2])}/{unquote(seg[3])}"
                rest = seg[4:]
                if not rest and method == "GET":
                    return self._repo_info(repo_id, user, "main")
                if rest[:1] == ["revision"] and len(rest) == 2 and method == "GET":
                    return self._repo_info(repo_id, user, unquote(rest[1]))
                if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
                    return self._tree(repo_id, user, unquote(rest[1]), unquote("/".join(rest[2:])), query)
                if rest[:1] == ["preupload"] and len(rest) == 2 and method == "POST":
                    return self._preupload(repo_id, user, unquote(rest[1]), json.loads(body or b"{}"))
                if rest[:1] == ["commit"] and len(rest) == 2 and method == "POST":
                    return self._commit(repo_id, user, unquote(rest[1]), body, query)
                if rest[:1] == ["branch"] and len(rest) == 2 and method == "POST":
                    return self._create_branch(repo_id, user, unquote(rest[1]), json.loads(body or b"{}"))
            if len(seg) >= 5 and seg[2] == "resolve" and seg[0] not in ("api", "datasets", "spaces"):
                repo_id = f"{unquote(seg[0])}/{unquote(seg[1])}"
                return self._resolve(
                    repo_id, user, unquote(seg[3]), unquote("/".join(seg[4:])), method, headers.get("Range")
                )
        self.unrouted.append((method, raw_path))
        raise HubError(404, f"fake hub: no route for {method} {raw_path}")

    def _create_repo(self, user, payload):
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        if repo_type != "model":
            raise HubError(400, f"the fake hub only hosts model repos, not {repo_type!r}")
        if not name or "/" in name:
            raise HubError(400, f"invalid repo name {name!r}")
        namespace = org or user
        repo_id = f"{namespace}/{name}"
        if not self._may_write(repo_id, user):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", body={"url": url})
        repo = Repo(repo_id, private=payload.get("visibility", "public") != "public" or bool(payload.get("private")))
        first = self._new_commit(repo, {".gitattributes": GITATTRIBUTES}, None, "initial commit")
        repo.refs["main"] = first.sha
        self.repos[repo_id] = repo
        return _json({"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self, payload):
        import yaml

        content = payload.get("content", "")
        if content.startswith("---"):
            header = content.split("---", 2)[1] if content.count("---") >= 2 else ""
            try:
                meta = yaml.safe_load(header)
            except yaml.YAMLError as err:
                return _json({"errors": [{"message": f"invalid YAML: {err}"}]}, status=400)
            if meta is not None and not isinstance(meta, dict):
                return _json({"errors": [{"message": "metadata must be a mapping"}]}, status=400)
        return _json({"errors": [], "warnings": []})

    def _repo_info(self, repo_id, user, revision):
        repo = self._readable(repo_id, user)
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return _json(
            {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.sha,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "lastModified": "2024-01-01T00:00:00.000Z",
                "createdAt": "2024-01-01T00:00:00.000Z",
                "siblings": [
                    {"rfilename": p, "size": len(c), "blobId": git_blob_sha1(c)}
                    for p, c in sorted(commit.files.items())
                ],
            }
        )

    def _tree(self, repo_id, user, revision, path, query):
        repo = self._readable(repo_id, user)
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: dict[str, dict] = {}
        for file_path, content in commit.files.items():
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if depth > 1 and not recursive:
                    break
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    folder,
                    {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder},
                )
            if recursive or len(parts) == 1:
                entries[file_path] = {
                    "type": "file",
                    "oid": git_blob_sha1(content),
                    "size": len(content),
                    "path": file_path,
                }
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
        return _json([entries[k] for k in sorted(entries)])

    def _preupload(self, repo_id, user, revision, payload):
        repo = self._writable(repo_id, user)
        commit = repo.resolve(revision)
        files = commit.files if commit is not None else {}
        return _json(
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None,
                    }
                    for f in payload.get("files", [])
                ],
                "commitOid": commit.sha if commit is not None else None,
            }
        )

    def _commit(self, repo_id, user, revision, body, query):
        repo = self._writable(repo_id, user)
        base = repo.resolve(revision)
        if base is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != base.sha:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, f"{value['path']} does not exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(folder)}
            else:  # lfsFile: this endpoint answers "regular" at preupload, so a client never sends one
                raise HubError(400, f"the fake hub does not store {key!r} entries (LFS/Xet uploads)")
        commit = self._new_commit(repo, files, base.sha, header.get("summary", ""))
        pr_url = None
        if query.get("create_pr", ["0"])[0] in ("1", "true"):
            repo.pull_requests += 1
            repo.refs[f"refs/pr/{repo.pull_requests}"] = commit.sha
            pr_url = f"{self.url}/{repo_id}/discussions/{repo.pull_requests}"
        else:
            branch = revision if revision in repo.refs else None
            if branch is None:
                raise HubError(400, f"cannot commit on {revision!r}: not a branch")
            repo.refs[branch] = commit.sha
        return _json(
            {
                "success": True,
                "commitOid": commit.sha,
                "pullRequestUrl": pr_url,
                "commitUrl": f"{self.url}/{repo_id}/commit/{commit.sha}",
            }
        )

    def _create_branch(self, repo_id, user, branch, payload):
        repo = self._writable(repo_id, user)
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = repo.resolve(payload.get("startingPoint") or "main")
        if start is None:
            raise HubError(404, f"Invalid rev id: {payload.get('startingPoint')}", "RevisionNotFound")
        repo.refs[branch] = start.sha
        return _json({})

    def _resolve(self, repo_id, user, revision, path, method, range_header):
        repo = self._readable(repo_id, user)
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if path not in commit.files:
            raise HubError(
                404, f"{path} does not exist at {revision}", "EntryNotFound", headers={"X-Repo-Commit": commit.sha}
            )
        content = commit.files[path]
        headers = {
            "ETag": f'"{git_blob_sha1(content)}"',
            "X-Repo-Commit": commit.sha,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        status = 200
        if range_header and range_header.startswith("bytes=") and method == "GET":
            start_s, _, end_s = range_header[6:].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        return status, headers, content


def _json(obj, status: int = 200):
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _serve(self, method: str) -> None:
            split = urlsplit(self.path)
            body = self._read_body() if method in ("POST", "PUT") else b""
            try:
                status, headers, payload = hub.handle(method, split.path, parse_qs(split.query), self.headers, body)
            except HubError as err:
                status, headers, payload = _json({"error": err.message, **err.body}, status=err.status)
                headers = {**headers, **err.headers}
                if err.code:
                    headers["X-Error-Code"] = err.code
            except Exception as err:  # a bug here must show as a 500, not a hung client
                status, headers, payload = _json({"error": f"fake hub crashed: {err!r}"}, status=500)
            hub.requests.append((method, split.path, status))
            self.send_response(status)
            headers.setdefault("X-Request-Id", f"fake-{len(hub.requests)}")
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_HEAD(self):  # noqa: N802
            self._serve("HEAD")

        def do_POST(self):  # noqa: N802
            self._serve("POST")

        def do_PUT(self):  # noqa: N802
            self._serve("PUT")

        def do_DELETE(self):  # noqa: N802
            self._serve("DELETE")

        def log_message(self, format, *args):  # quiet: the request log is `hub.requests`
            pass

    return Handler


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN:USER",
        help="a valid token and its user; repeat for several",
    )
    args = parser.parse_args()
    tokens = dict(t.split(":", 1) for t in args.token)
    with FakeHub(tokens=tokens, port=args.port) as served:
        print(f"fake hub at {served.url}  (export HF_ENDPOINT={served.url})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
