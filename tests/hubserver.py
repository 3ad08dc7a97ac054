"""A Hugging Face Hub-compatible HTTP endpoint on loopback, for driving the real huggingface_hub client.

It answers what huggingface_hub 0.20 → 2.x ask when listing and downloading a model repo:

    GET  /api/models/{org}/{name}/refs                       branches → commits
    GET  /api/models/{org}/{name}/tree/{revision}            files, sizes, git oids, LFS sha256
    GET  /api/models/{org}/{name}/revision/{revision}        repo info (resolve_revision: "sha")
    HEAD /{org}/{name}/resolve/{revision}/{file}             X-Repo-Commit, ETag, X-Linked-Etag/-Size
    GET  /{org}/{name}/resolve/{revision}/{file}             the bytes; Range → 206 (resumed downloads)

Weight files (.bin, .safetensors) are served as LFS files (ETag = sha256, as the Hub does), the
rest as git files (ETag = git blob id). Errors carry the Hub's X-Error-Code header so the client
raises RepositoryNotFoundError, RevisionNotFoundError and RemoteEntryNotFoundError.

Faults are injected per request with :meth:`HubServer.fault`: ``"500"`` (an internal error),
``"drop"`` (headers for the whole file, half the bytes, then the connection closes) and
``"corrupt"`` (the right length, one byte flipped, so only a sha256 check notices) and ``"stall"``
(headers for the whole file, a few bytes, then silence until the client gives up). Every request
is logged in ``server.log`` so tests can say what was (not) downloaded.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth")


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """A model repo: commits (file name → bytes) and branches pointing at them."""

    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def commit(self, branch: str, files: dict[str, bytes]) -> str:
        """Add a commit holding ``files`` and point ``branch`` at it; returns the commit id."""
        sha = hashlib.sha1(f"{self.repo_id}:{branch}:{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


def _entry(name: str, data: bytes) -> dict[str, object]:
    if name.endswith(LFS_SUFFIXES):
        sha = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
        return {"type": "file", "path": name, "size": len(data), "oid": git_oid(pointer),
                "lfs": {"oid": sha, "size": len(data), "pointerSize": len(pointer)}}
    return {"type": "file", "path": name, "size": len(data), "oid": git_oid(data)}


@dataclass
class Hit:
    method: str
    path: str
    range: str | None
    status: int
    fault: str | None = None


@dataclass
class _Fault:
    kind: str
    file: str | None
    api: str | None
    commit: str | None
    times: int  # -1: every time


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up (e.g. after a 500)
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class HubServer:
    """``with HubServer([repo]) as server:`` → ``server.url`` for HF_ENDPOINT."""

    def __init__(self, repos: list[Repo]) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.log: list[Hit] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},  # stop() in 20 ms, not 0.5 s
                                        name="hubserver", daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def fault(self, kind: str, *, file: str | None = None, api: str | None = None, repo: str | None = None,
              branch: str | None = None, times: int = 1) -> None:
        """Inject ``kind`` ("500", "drop", "corrupt", "stall") into the next ``times`` matching requests:
        GETs of ``file`` (at ``branch``'s commit, if given), or the API call ``api`` ("refs", "tree" …)."""
        commit = self.repos[repo].branches[branch] if repo and branch else None
        self._faults.append(_Fault(kind, file, api, commit, times))

    def _take_fault(self, file: str | None, api: str | None, commit: str | None) -> str | None:
        with self._lock:
            for f in self._faults:
                if f.times == 0:
                    continue
                if (f.file is not None and f.file == file and f.commit in (None, commit)) or \
                        (f.api is not None and f.api == api):
                    if f.times > 0:
                        f.times -= 1
                    return f.kind
        return None

    def downloads(self, name: str | None = None) -> list[Hit]:
        """GETs of file contents (header probes, i.e. ranges with an end, excluded)."""
        return [h for h in self.log if h.method == "GET" and "/resolve/" in h.path and h.status in (200, 206)
                and (h.range is None or h.range.endswith("-"))
                and (name is None or h.path.endswith("/" + name))]

    def probes(self) -> list[Hit]:
        """Range requests with an end: safetensors header reads."""
        return [h for h in self.log if h.method == "GET" and h.range is not None and not h.range.endswith("-")]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # Responses ----------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              fault: str | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            if k != "Content-Length":  # sent once, below: a repeated one reads "2, 2" and 0.3x clients refuse it
                self.send_header(k, v)
        self.send_header("Content-Length", (headers or {}).get("Content-Length", str(len(body))))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.hub.log.append(Hit(self.command, self.path, self.headers.get("Range"), status, fault))

    def _json(self, obj: object) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, extra: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps({"error": code}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": code, **(extra or {})}, head=head)

    # Routing ------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 5:
            return self._api(f"{parts[2]}/{parts[3]}", parts[4], parts[5:], head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        self._error(404, "NotFound", head=head)

    def _api(self, repo_id: str, what: str, rest: list[str], head: bool) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", head=head)
        fault = self.hub._take_fault(None, what, None)
        if fault == "500":
            return self._send(500, b"internal error", fault=fault)
        if what == "refs":
            return self._json({"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                                            for b, c in sorted(repo.branches.items())],
                               "converts": [], "tags": []})
        if what in ("tree", "revision") and rest:
            commit = repo.resolve(rest[0])
            if commit is None:
                return self._error(404, "RevisionNotFound")
            files = repo.commits[commit]
            if what == "tree":
                return self._json([_entry(n, d) for n, d in sorted(files.items())])
            return self._json({"id": repo_id, "sha": commit, "private": False,
                               "siblings": [{"rfilename": n} for n in sorted(files)]})
        self._error(404, "NotFound")

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", head=head)
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", head=head)
        data = repo.commits[commit].get(name)
        if data is None:
            return self._error(404, "EntryNotFound", {"X-Repo-Commit": commit}, head=head)
        entry = _entry(name, data)
        lfs = entry.get("lfs")
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if lfs:
            sha = lfs["oid"]  # type: ignore[index]
            headers |= {"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        if head:
            return self._send(200, b"", headers | {"Content-Length": str(len(data))}, head=True)

        rng = self.headers.get("Range")
        # Header probes (a range with an end, e.g. safetensors metadata) are not faulted; whole
        # files and resumed transfers ("bytes=N-") are.
        probe = bool(rng and not rng.endswith("-"))
        fault = None if probe else self.hub._take_fault(name, None, commit)
        if fault == "500":
            return self._send(500, b"internal error", fault=fault)
        if fault == "corrupt":
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        start, end, status = 0, len(data) - 1, 200
        if rng and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start = int(a) if a else 0
            end = min(int(b), len(data) - 1) if b else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start:end + 1]
        if fault == "stall":
            # The whole length announced, 16 bytes sent, then nothing: a read timeout on the client.
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:16])
            self.wfile.flush()
            self.hub.log.append(Hit(self.command, self.path, rng, status, fault))
            self.close_connection = True
            self.connection.settimeout(None)
            try:
                self.connection.recv(1)  # returns when the client closes the connection
            except OSError:
                pass
            return None
        if fault == "drop":
            # The whole length announced, half of it sent, then the connection goes away.
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.hub.log.append(Hit(self.command, self.path, rng, status, fault))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(status, body, headers, fault=fault)


def set_client(monkeypatch: Any, **settings: object) -> None:
    """Point huggingface_hub at the loopback Hub and a fresh cache. 2.x and 1.x read ``constants.X``
    at each call; 0.2x clients copied some names into file_download and hf_api at import, so every
    loaded huggingface_hub module holding the name gets the value (names a version lacks are skipped)."""
    import huggingface_hub.file_download  # noqa: F401  (loaded, so its copies are patched too)
    import huggingface_hub.hf_api  # noqa: F401
    from huggingface_hub import constants

    mods = [m for name, m in list(sys.modules.items()) if name.startswith("huggingface_hub.") and m is not None]
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value, raising=False)
        for m in mods:
            if m is not constants and name in vars(m):
                monkeypatch.setattr(m, name, value)
