"""A small stand-in for the Hugging Face Hub's HTTP API on the loopback, for the push tests.

It answers the requests huggingface_hub 2.4 makes for `HfApi.create_repo` + `upload_folder` (read in its
sources: hf_api.py `create_repo`, `_validate_yaml`, `repo_info`; _commit_api.py `_fetch_upload_modes`,
`_prepare_commit_payload`, `_send_commit`; _upload_pipeline.py):
    POST /api/repos/create                          {name, organization, type, visibility} -> {url}; 409 if it exists
    POST /api/validate-yaml                         {content, repoType} -> {errors, warnings}; 400 on bad YAML
    GET  /api/{type}s/{namespace}/{name}[/revision/{revision}]  repo info (create_repo asks it after a 401 or
                                                    403, upload_folder when no file changed); other GETs get 404
                                                    (the client's daily fetch of /api/agent-harnesses allows it)
    POST /api/{type}s/{namespace}/{name}/preupload/{revision}   {files: [{path, sample, size}]}
                                                    -> {files: [{path, uploadMode, shouldIgnore, oid}]}
    POST /api/{type}s/{namespace}/{name}/commit/{revision}      ndjson: a header line, then one line per file
Every request must carry `Authorization: Bearer <token>` with a token the server was given (401 otherwise).
It answers uploadMode "regular" for every file, so the client sends each file base64-encoded inside the
commit. The real Hub routes large and binary files through LFS/Xet storage, a protocol this server does not
speak: a commit line of another kind gets 422, so a test cannot pass by silently dropping a file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

REPO_PATH = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>preupload|commit)/(?P<rev>[^/?]+))?"
)


@dataclass
class Repo:
    repo_type: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Hub:
    """What arrived: repos by (type, id), and every request as (method, path)."""

    tokens: set[str]
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    endpoint: str = ""


class Handler(BaseHTTPRequestHandler):
    hub: Hub  # set on the subclass the server makes

    def log_message(self, *_: Any) -> None:  # keep pytest's output clean
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if token in self.hub.tokens:
            return True
        self._send(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.hub.requests.append(("GET", self.path))
        if not self._authorised():
            return
        match = REPO_PATH.match(self.path)
        repo = self.hub.repos.get((match["type"][:-1], match["repo"])) if match else None
        if repo is None:
            self._send(404, {"error": "Repository not found"})
            return
        sha = repo.commits[-1]["oid"] if repo.commits else "0" * 40
        self._send(200, {"id": match["repo"], "private": repo.private, "sha": sha})

    def do_POST(self) -> None:  # noqa: N802
        self.hub.requests.append(("POST", self.path))
        body = self._body()
        if not self._authorised():
            return
        if self.path == "/api/repos/create":
            self._create(json.loads(body))
        elif self.path == "/api/validate-yaml":
            self._validate(json.loads(body))
        elif (match := REPO_PATH.match(self.path)) and match["op"]:
            repo = self.hub.repos.get((match["type"][:-1], match["repo"]))
            if repo is None:
                self._send(404, {"error": "Repository not found"})
            elif match["op"] == "preupload":
                self._preupload(repo, json.loads(body))
            else:
                self._commit(repo, match["type"], match["repo"], body)
        else:
            self._send(404, {"error": f"no route {self.path}"})

    def _create(self, payload: dict[str, Any]) -> None:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}"
        if (repo_type, repo_id) in self.hub.repos:
            self._send(
                409, {"error": "You already created this repo", "url": f"{self.hub.endpoint}/{repo_id}"}
            )
            return
        self.hub.repos[(repo_type, repo_id)] = Repo(repo_type, payload.get("visibility") == "private")
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._send(200, {"url": f"{self.hub.endpoint}/{prefix}{repo_id}"})

    def _validate(self, payload: dict[str, Any]) -> None:
        text = payload.get("content", "")
        head = re.match(r"^---\n(.*?)\n---\n", text, re.S)
        try:
            meta = yaml.safe_load(head.group(1)) if head else None
        except yaml.YAMLError as err:
            self._send(400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []})
            return
        warnings = [] if isinstance(meta, dict) and meta else [{"message": "empty or missing yaml metadata"}]
        self._send(200, {"errors": [], "warnings": warnings})

    def _preupload(self, repo: Repo, payload: dict[str, Any]) -> None:
        files = []
        for f in payload["files"]:
            have = repo.files.get(f["path"])
            oid = hashlib.sha1(b"blob %d\0" % len(have) + have).hexdigest() if have is not None else None
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files})

    def _commit(self, repo: Repo, type_path: str, repo_id: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            self._send(400, {"error": "the first line must be the header"})
            return
        added = {}
        for line in lines[1:]:
            value = line.get("value", {})
            if line.get("key") != "file" or value.get("encoding") != "base64":
                self._send(422, {"error": f"this server stores base64 files only, got {line.get('key')!r}"})
                return
            added[value["path"]] = base64.b64decode(value["content"])
        repo.files |= added
        oid = hashlib.sha1(body).hexdigest()
        repo.commits.append({"summary": lines[0]["value"].get("summary"), "files": sorted(added), "oid": oid})
        prefix = "" if type_path == "models" else f"{type_path}/"
        self._send(
            200, {"commitUrl": f"{self.hub.endpoint}/{prefix}{repo_id}/commit/{oid}", "commitOid": oid}
        )


class HubServer:
    """`with HubServer({"token"}) as hub:` serves on 127.0.0.1 (a free port) until the block ends."""

    def __init__(self, tokens: set[str]):
        self.hub = Hub(tokens)
        handler = type("BoundHandler", (Handler,), {"hub": self.hub})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.hub.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hub:
        self.thread.start()
        return self.hub

    def __exit__(self, *_: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
