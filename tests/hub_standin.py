"""A loopback stand-in for the Hugging Face Hub, for tests (no network, no LFS, no xet).

It answers the routes that `huggingface_hub` 2.4 calls to create a repo and a branch, upload a folder
(`preupload` + `commit`), validate a model card, list a repo (info, tree, refs) and download files
(`resolve`, HEAD and GET), and the two a `--push_to_hub` preflight calls: `whoami-v2` and
`auth-check/write` (a repo in `read_only` answers 403 there). Every file is declared "regular" at preupload time, so its bytes arrive
base64-encoded inside the ndjson commit; responses carry no `X-Xet-*` header, so downloads are plain
HTTP GETs. Repos live in memory: per repo, `branches` (name -> commit id) and `commits`
(commit id -> {path: bytes}).

Usage (point a *subprocess* at it, since `huggingface_hub` reads `HF_ENDPOINT` at import time):

    with run_standin(token="hf_test") as server:
        env = {..., "HF_ENDPOINT": server.url}
        server.fail_commits(revision="student-4steps")  # the next commit to that branch fails

Failure injection: `fail_commits(count, repo_id, revision, skip, status)` makes `count` commits that
match the repo and revision (None matches any) answer HTTP `status`, after letting `skip` through.
The default 507 is not retried by `huggingface_hub`; a 500 is retried with backoff (about 23 s before
it gives up), so use it only to test that retry.
"""

import base64
import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"

API_ROUTE = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)"
    r"(?:/(?P<action>revision|tree|preupload|commit|branch|refs)(?:/(?P<rev>[^/]+)(?:/(?P<path>.+))?)?)?$"
)
AUTH_CHECK_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/auth-check(?P<write>/write)?$")
RESOLVE_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_sha(content: bytes) -> str:
    """Git object id of a blob: sha1(b"blob {size}\\0" + content), what the Hub calls a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    """One model repo: its branches (name -> commit id) and every commit's full file tree."""

    private: bool
    branches: dict = field(default_factory=dict)
    commits: dict = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Commit id of a branch name or of a commit id; None if unknown."""
        if revision in self.commits:
            return revision
        return self.branches.get(revision)


@dataclass
class FailureRule:
    """Fail `count` commits to `repo_id`/`revision` (None: any) with HTTP `status`, after `skip` pass."""

    repo_id: str | None
    revision: str | None
    skip: int
    count: int
    status: int


class HubError(Exception):
    """An HTTP error answer: status, `X-Error-Code` header and JSON error message."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class StandinServer(ThreadingHTTPServer):
    """In-memory Hub on 127.0.0.1 (port chosen by the OS); `url` is its HF_ENDPOINT."""

    daemon_threads = True

    def __init__(self, token: str):
        super().__init__(("127.0.0.1", 0), StandinHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.commit_log: list[dict] = []  # {"repo_id", "revision", "oid", "paths"} per accepted commit
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for debugging
        self.lock = threading.Lock()
        self.failure_rules: list[FailureRule] = []
        self.read_only: set[str] = set()  # repo ids the token may read but not write (auth-check/write answers 403)
        self._counter = 0

    def fail_commits(self, count=1, repo_id=None, revision=None, skip=0, status=507):
        """Make `count` commits to `repo_id`/`revision` (None: any) fail with HTTP `status`, after `skip` pass."""
        with self.lock:
            self.failure_rules.append(FailureRule(repo_id, revision, skip, count, status))

    # -- state changes (called with `lock` held) ------------------------------------------------

    def new_commit(self, repo: Repo, files: dict) -> str:
        """Store a full file tree as a new commit and return its id."""
        self._counter += 1
        digest = hashlib.sha1(str(self._counter).encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha(files[path])}\0".encode())
        oid = digest.hexdigest()
        repo.commits[oid] = files
        return oid

    def injected_failure(self, repo_id: str, revision: str) -> int | None:
        """HTTP status of the first failure rule this commit consumes, or None if it may go through."""
        for rule in self.failure_rules:
            if rule.count <= 0 or rule.repo_id not in (None, repo_id) or rule.revision not in (None, revision):
                continue
            if rule.skip > 0:
                rule.skip -= 1
                return None
            rule.count -= 1
            return rule.status
        return None


class StandinHandler(BaseHTTPRequestHandler):
    """Routes one request to the method named after its endpoint."""

    server: StandinServer

    def log_message(self, format, *args):  # noqa: A002 - keep the test output quiet
        pass

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def dispatch(self, method: str):
        """Parse the route, call its handler under the lock, and write the answer."""
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.requests.append((method, path))
            try:
                status, headers, payload = self.route(method, path, body)
            except HubError as err:
                headers = {"X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                if err.commit:
                    headers["X-Repo-Commit"] = err.commit
                status, payload = err.status, json.dumps({"error": err.message}).encode()
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        headers["Content-Length"] = str(len(payload))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def route(self, method: str, path: str, body: bytes):
        """Return (status, headers, payload bytes) for one request, or raise HubError."""
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self.answer({"errors": [], "warnings": []})
        if method == "GET" and path == "/api/whoami-v2":
            self.check_token()
            return self.answer({"type": "user", "name": "standin-user", "orgs": [],
                                "auth": {"type": "access_token", "accessToken": {"displayName": "standin", "role": "write"}}})
        match = AUTH_CHECK_ROUTE.match(path)
        if match and method == "GET":
            self.check_token()
            self.get_repo(match["repo"])
            if match["write"] and match["repo"] in self.server.read_only:
                raise HubError(403, "You don't have write access to this repo")
            return self.answer({})
        match = API_ROUTE.match(path)
        if match:
            repo_id, action = match["repo"], match["action"] or "revision"
            rev = unquote(match["rev"]) if match["rev"] else "main"
            if method == "POST" and action in ("branch", "preupload", "commit"):
                self.check_token()
                repo = self.get_repo(repo_id)
                return getattr(self, f"post_{action}")(repo_id, repo, rev, body)
            if method == "GET" and action in ("revision", "tree", "refs"):
                return getattr(self, f"get_{action}")(repo_id, self.readable_repo(repo_id), rev)
        match = RESOLVE_ROUTE.match(path)
        if match and method in ("HEAD", "GET"):
            return self.resolve_file(match["repo"], unquote(match["rev"]), unquote(match["path"]))
        raise HubError(404, f"hub_standin does not implement {method} {path}")

    # -- helpers --------------------------------------------------------------------------------

    def answer(self, data, status: int = 200):
        """A JSON answer."""
        return status, {}, json.dumps(data).encode()

    def check_token(self):
        """Write routes need `Authorization: Bearer <the server's token>`."""
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def get_repo(self, repo_id: str) -> Repo:
        """The repo, or a RepoNotFound answer."""
        if repo_id not in self.server.repos:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return self.server.repos[repo_id]

    def readable_repo(self, repo_id: str) -> Repo:
        """The repo if it is public or the request carries the token; private repos look missing otherwise."""
        repo = self.get_repo(repo_id)
        if repo.private and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            raise HubError(401, "Repository not found", code="RepoNotFound")
        return repo

    def get_commit(self, repo: Repo, revision: str) -> str:
        """Commit id of a revision, or a RevisionNotFound answer."""
        oid = repo.resolve(revision)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return oid

    # -- write routes ---------------------------------------------------------------------------

    def create_repo(self, payload: dict):
        """POST /api/repos/create: new repo whose `main` holds one commit with `.gitattributes`."""
        self.check_token()
        repo_id = f"{payload.get('organization') or 'standin-user'}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.server.repos:
            return self.answer({"error": "You already created this model repo", "url": url}, status=409)
        repo = Repo(private=payload.get("visibility") == "private")
        repo.branches["main"] = self.server.new_commit(repo, {".gitattributes": GITATTRIBUTES})
        self.server.repos[repo_id] = repo
        return self.answer({"url": url, "name": repo_id})

    def post_branch(self, repo_id: str, repo: Repo, branch: str, body: bytes):
        """POST .../branch/{branch}: branch off `startingPoint` (default `main`); 409 if it exists."""
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        repo.branches[branch] = self.get_commit(repo, start)
        return self.answer({})

    def post_preupload(self, repo_id: str, repo: Repo, revision: str, body: bytes):
        """POST .../preupload/{rev}: every file is "regular"; `oid` lets the client skip unchanged files."""
        files = repo.commits[self.get_commit(repo, revision)]
        answer = [
            {
                "path": item["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha(files[item["path"]]) if item["path"] in files else None,
            }
            for item in json.loads(body)["files"]
        ]
        return self.answer({"files": answer, "commitOid": repo.resolve(revision)})

    def post_commit(self, repo_id: str, repo: Repo, revision: str, body: bytes):
        """POST .../commit/{rev}: apply an ndjson commit (inline files and deletions) to a branch."""
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        status = self.server.injected_failure(repo_id, revision)
        if status is not None:
            raise HubError(status, "Injected failure (hub_standin)")
        files = dict(repo.commits[repo.branches[revision]])
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            elif key != "header":
                raise HubError(400, f"hub_standin does not support commit operation {key!r} (only regular files)")
        oid = self.server.new_commit(repo, files)
        repo.branches[revision] = oid
        paths = [line["value"]["path"] for line in lines if line["key"] != "header"]
        self.server.commit_log.append({"repo_id": repo_id, "revision": revision, "oid": oid, "paths": paths})
        url = f"{self.server.url}/{repo_id}/commit/{oid}"
        return self.answer({"success": True, "commitOid": oid, "commitUrl": url})

    # -- read routes ----------------------------------------------------------------------------

    def get_revision(self, repo_id: str, repo: Repo, revision: str):
        """GET /api/models/{repo}[/revision/{rev}]: model info with `sha` and `siblings`."""
        oid = self.get_commit(repo, revision)
        siblings = [{"rfilename": path} for path in sorted(repo.commits[oid])]
        info = {"id": repo_id, "modelId": repo_id, "sha": oid, "private": repo.private, "siblings": siblings}
        return self.answer(info)

    def get_tree(self, repo_id: str, repo: Repo, revision: str):
        """GET .../tree/{rev}: every file of the revision (recursive listing, one page)."""
        files = repo.commits[self.get_commit(repo, revision)]
        entries = [
            {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)}
            for path, data in sorted(files.items())
        ]
        return self.answer(entries)

    def get_refs(self, repo_id: str, repo: Repo, revision: str):
        """GET .../refs: the branches and their head commits."""
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in repo.branches.items()
        ]
        return self.answer({"branches": branches, "converts": [], "tags": []})

    def resolve_file(self, repo_id: str, revision: str, path: str):
        """HEAD/GET /{repo}/resolve/{rev}/{path}: the bytes with X-Repo-Commit, ETag and Content-Length."""
        repo = self.readable_repo(repo_id)
        oid = self.get_commit(repo, revision)
        files = repo.commits[oid]
        if path not in files:
            raise HubError(404, "Entry not found", code="EntryNotFound", commit=oid)
        content = files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha(content)}"',
            "X-Repo-Commit": oid,
        }
        return 200, headers, content


@contextlib.contextmanager
def run_standin(token: str = "hf_standin_token", lifetime_s: float = 600.0):
    """Serve a fresh stand-in Hub in a background thread; it stops on exit or after `lifetime_s`."""
    server = StandinServer(token)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(lifetime_s, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield server
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join()
