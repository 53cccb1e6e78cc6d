"""pipelines.models.download against a fake Hugging Face hub served from 127.0.0.1 (never the network).

The fake implements what huggingface_hub 2.4.0 calls (``model_info``, ``get_hf_file_metadata``; also the
tree listing of ``list_repo_tree``/``snapshot_download``) and what the module's own streamer fetches:
``GET /api/models/{repo}[/revision/{rev}]`` (repo info with ``sha`` and ``siblings``),
``GET /api/models/{repo}/tree/{rev}`` (recursive file listing) and
``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``, ``Content-Length``, Range).
Like the real hub, it can answer a resolve with a redirect to a "CDN" (a second server on another port,
``X-Linked-Etag``/``X-Linked-Size`` on the redirect) that refuses requests carrying a token. It also serves
plain file URLs, and can hang up after a given number of bytes to imitate a dropped connection.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from pipelines.models.download import (
    MODEL_KINDS,
    STANDARD_SD15,
    STANDARD_SD15_FILE,
    DownloadError,
    canonical_kind,
    download_model,
    standard_download_command,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_safetensors(seed: int, values: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    return save_safetensors({"weight": rng.standard_normal(values).astype(np.float32)})


@dataclass
class ServedRequest:
    method: str
    path: str
    range_header: str | None
    authorization: str | None
    bytes_sent: int = 0
    redirected: bool = False


@dataclass
class FakeHub:
    """What the fake server hosts, and a log of every request it answered."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    private_tokens: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    dispositions: dict[str, str] = field(default_factory=dict)
    html_pages: set[str] = field(default_factory=set)
    cut_first_get: set[str] = field(default_factory=set)
    # repo file path -> bytes to send before hanging up, on the next GET of that file's body (then forgotten)
    cut_hub_file_after: dict[str, int] = field(default_factory=dict)
    # repo file path -> ETag to announce instead of the real SHA-256 (a corrupted mirror or proxy)
    etag_overrides: dict[str, str] = field(default_factory=dict)
    # repo file paths whose resolve answers 302 to the CDN server, as the hub does for LFS files
    served_by_cdn: set[str] = field(default_factory=set)
    log: list[ServedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    cdn_url: str = ""

    def gets_of(self, path_in_repo: str) -> list[ServedRequest]:
        """Body requests for a repo file: hub resolve GETs answered with bytes, and CDN GETs."""
        with self.lock:
            return [
                r
                for r in self.log
                if r.method == "GET"
                and (
                    f"/resolve/{COMMIT}/{path_in_repo}" in r.path
                    or re.fullmatch(rf"/cdn/[^/]+/[^/]+/{re.escape(path_in_repo)}", r.path)
                )
                and not r.redirected
            ]

    def take_cut(self, path_in_repo: str) -> int | None:
        with self.lock:
            return self.cut_hub_file_after.pop(path_in_repo, None)

    def requests_for(self, path_suffix: str, method: str | None = None) -> list[ServedRequest]:
        with self.lock:
            return [
                r for r in self.log if r.path.endswith(path_suffix) and (method is None or r.method == method)
            ]

    def resolve_paths(self) -> set[str]:
        with self.lock:
            return {
                unquote(r.path.split("/resolve/", 1)[1].split("/", 1)[1])
                for r in self.log
                if "/resolve/" in r.path
            }


class FakeHubHandler(BaseHTTPRequestHandler):
    hub: FakeHub
    timeout = 10  # seconds a stuck connection may hold a server thread

    def log_message(self, format: str, *args: object) -> None:  # silence per-request logging
        return

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # --- routing -----------------------------------------------------------------------------
    def _route(self, *, head: bool) -> None:
        record = ServedRequest(
            self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization")
        )
        with self.hub.lock:
            self.hub.log.append(record)
        path = urlsplit(self.path).path
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            self._model_info(match[1], unquote(match[2] or "main"))
        elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
            self._tree(match[1], unquote(match[2]))
        elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            self._resolve(match[1], unquote(match[2]), unquote(match[3]), record, head=head)
        elif match := re.fullmatch(r"/cdn/([^/]+/[^/]+)/(.+)", path):
            self._cdn(match[1], unquote(match[2]), record, head=head)
        elif path in self.hub.files:
            self._plain(path, record, head=head)
        else:
            self._error(404, "Not found")

    def _repo_files(self, repo_id: str, revision: str) -> dict[str, bytes] | None:
        """The repo's files, or None after answering with the hub's error for it."""
        if repo_id not in self.hub.repos:
            self._error(404, "Repository not found", code="RepoNotFound")
            return None
        token = self.hub.private_tokens.get(repo_id)
        if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
            self._error(401, "Invalid username or password.", code="RepoNotFound")
            return None
        if revision not in ("main", COMMIT):
            self._error(404, "Invalid rev id", code="RevisionNotFound")
            return None
        return self.hub.repos[repo_id]

    def _model_info(self, repo_id: str, revision: str) -> None:
        files = self._repo_files(repo_id, revision)
        if files is not None:
            siblings = [{"rfilename": name} for name in sorted(files)]
            info = {"id": repo_id, "sha": COMMIT, "private": repo_id in self.hub.private_tokens}
            self._json({**info, "siblings": siblings})

    def _tree(self, repo_id: str, revision: str) -> None:
        files = self._repo_files(repo_id, revision)
        if files is None:
            return
        folders = sorted({str(Path(name).parent) for name in files} - {"."})
        entries: list[dict[str, object]] = [
            {"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0}
            for folder in folders
        ]
        entries += [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in sorted(files.items())
        ]
        self._json(entries)

    def _resolve(self, repo_id: str, revision: str, name: str, record: ServedRequest, *, head: bool) -> None:
        files = self._repo_files(repo_id, revision)
        if files is None:
            return
        if name not in files:
            self._error(404, "Entry not found", code="EntryNotFound", commit=True)
            return
        data = files[name]
        etag = self.hub.etag_overrides.get(name, hashlib.sha256(data).hexdigest())
        if name in self.hub.served_by_cdn:  # the hub's LFS answer: metadata here, bytes at a signed URL
            with self.hub.lock:
                record.redirected = True
            self.send_response(302)
            for key, value in {
                "X-Repo-Commit": COMMIT,
                "X-Linked-Etag": f'"{etag}"',
                "X-Linked-Size": str(len(data)),
                "Location": f"{self.hub.cdn_url}/cdn/{repo_id}/{name}",
                "Content-Length": "0",
            }.items():
                self.send_header(key, value)
            self.end_headers()
            return
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}
        cut_after = None if head else self.hub.take_cut(name)
        self._body(data, record, headers, head=head, cut_after=cut_after)

    def _cdn(self, repo_id: str, name: str, record: ServedRequest, *, head: bool) -> None:
        if self.headers.get("Authorization") is not None:  # signed URLs refuse a second credential
            self._error(400, "Only one auth mechanism allowed")
            return
        data = self.hub.repos[repo_id][name]
        headers = {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}  # storage etag: not the hub's
        cut_after = None if head else self.hub.take_cut(name)
        self._body(data, record, headers, head=head, cut_after=cut_after)

    def _plain(self, path: str, record: ServedRequest, *, head: bool) -> None:
        data = self.hub.files[path]
        headers: dict[str, str] = {}
        if path in self.hub.dispositions:
            headers["Content-Disposition"] = f'attachment; filename="{self.hub.dispositions[path]}"'
        if path in self.hub.html_pages:
            headers["Content-Type"] = "text/html; charset=utf-8"
        cut = not head and path in self.hub.cut_first_get
        self.hub.cut_first_get.discard(path)
        self._body(data, record, headers, head=head, cut_after=len(data) // 2 if cut else None)

    # --- responses ---------------------------------------------------------------------------
    def _body(
        self,
        data: bytes,
        record: ServedRequest,
        headers: dict[str, str],
        *,
        head: bool,
        cut_after: int | None = None,
    ) -> None:
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match[1])
            end = int(match[2]) if match[2] else len(data) - 1
            if start >= len(data):
                self._error(416, "Range not satisfiable", extra={"Content-Range": f"bytes */{len(data)}"})
                return
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self.send_response(status)
        headers.setdefault("Content-Type", "application/octet-stream")
        for key, value in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        sent = body[:cut_after] if cut_after is not None else body
        with self.hub.lock:  # recorded first: the client may be done before this thread runs again
            record.bytes_sent = len(sent)
        self.wfile.write(sent)
        self.wfile.flush()
        if cut_after is not None:  # promise the whole body, deliver part of it, hang up: a dropped connection
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _json(self, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        commit: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Error-Message", message)
        if code:
            self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", COMMIT)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake hub on 127.0.0.1, with HF_ENDPOINT pointing at it and every other hub setting isolated."""
    import huggingface_hub
    from huggingface_hub import constants

    fake = FakeHub()
    handler = type("BoundFakeHubHandler", (FakeHubHandler,), {"hub": fake})
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in ("hub", "cdn")]
    threads = []
    for server in servers:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        threads.append(thread)
    fake.url, fake.cdn_url = (f"http://127.0.0.1:{server.server_address[1]}" for server in servers)

    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_CACHE",
    ):
        monkeypatch.delenv(name, raising=False)
    for name in ("HUGGINGFACE_HUB_CACHE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    # huggingface_hub read these at import time: keep a token file of this machine out of the requests.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    # Traffic must stay on 127.0.0.1: note any look-up of another host (libraries may swallow the error).
    foreign_hosts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host: object, *args: object, **kwargs: object) -> object:
        if host not in ("127.0.0.1", "localhost", b"127.0.0.1", b"localhost"):
            foreign_hosts.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, f"test blocks {host!r}: traffic must stay on 127.0.0.1")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    huggingface_hub.close_session()  # its shared HTTP client must pick up the proxy settings above
    try:
        yield fake
    finally:
        huggingface_hub.close_session()
        # shutdown() waits for the serve loop's next poll: stop both servers at once, not one after the other
        stoppers = [threading.Thread(target=server.shutdown) for server in servers]
        for stopper in stoppers:
            stopper.start()
        for stopper, server, thread in zip(stoppers, servers, threads, strict=True):
            stopper.join(timeout=5)
            server.server_close()
            thread.join(timeout=5)
    assert foreign_hosts == [], f"requests left 127.0.0.1 for {foreign_hosts}"


def visible_files(folder: Path) -> set[str]:
    """Files under ``folder`` as relative POSIX paths, hidden ones included (nothing should be left over)."""
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def test_single_safetensors_at_repo_root_is_picked(hub: FakeHub, tmp_path: Path) -> None:
    weights = tiny_safetensors(0)
    hub.repos["tester/tiny-checkpoint"] = {
        "tiny.safetensors": weights,
        "README.md": b"# tiny",
        "sub/x.json": b"{}",
    }

    paths = download_model("tester/tiny-checkpoint", tmp_path / "models", progress=False)

    target = tmp_path / "models" / "Stable-diffusion"
    assert paths == [target / "tiny.safetensors"]
    assert paths[0].read_bytes() == weights
    assert visible_files(target) == {"tiny.safetensors"}  # no staging folder or hub bookkeeping left
    assert hub.resolve_paths() == {"tiny.safetensors"}


@pytest.mark.parametrize(
    "source",
    [
        "tester/tiny/unet/model.safetensors",
        "https://huggingface.co/tester/tiny/resolve/main/unet/model.safetensors?download=true",
        "https://huggingface.co/tester/tiny/blob/main/unet/model.safetensors",
        "{url}/tester/tiny/resolve/main/unet/model.safetensors",
    ],
)
def test_file_forms_go_through_the_configured_endpoint(hub: FakeHub, tmp_path: Path, source: str) -> None:
    weights = tiny_safetensors(1)
    hub.repos["tester/tiny"] = {"unet/model.safetensors": weights, "a.safetensors": b"", "b.safetensors": b""}

    paths = download_model(source.format(url=hub.url), tmp_path, kind="lora", progress=False)

    assert paths == [tmp_path / "Lora" / "model.safetensors"]
    assert paths[0].read_bytes() == weights
    assert hub.resolve_paths() == {"unet/model.safetensors"}


def test_filename_argument_picks_a_file(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["tester/many"] = {"a.safetensors": tiny_safetensors(2), "b.safetensors": tiny_safetensors(3)}

    paths = download_model("tester/many", tmp_path, kind="VAE", filename="b.safetensors", progress=False)

    assert paths == [tmp_path / "VAE" / "b.safetensors"]
    assert paths[0].read_bytes() == hub.repos["tester/many"]["b.safetensors"]


def test_several_root_checkpoints_need_a_choice(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["tester/many"] = {"a.safetensors": b"", "b.safetensors": b"", "c.ckpt": b""}

    with pytest.raises(DownloadError, match=r"tester/many.*a\.safetensors, b\.safetensors") as error:
        download_model("tester/many", tmp_path, progress=False)
    assert "--file" in str(error.value)
    assert hub.resolve_paths() == set()


def diffusers_repo() -> dict[str, bytes]:
    return {
        "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
        "README.md": b"# card",
        "v1-5-pruned-emaonly.safetensors": tiny_safetensors(10),  # root single-file copy: not part of it
        "v1-5-pruned.ckpt": b"pickle",
        "unet/config.json": b"{}",
        "unet/diffusion_pytorch_model.safetensors": tiny_safetensors(11),
        "unet/diffusion_pytorch_model.fp16.safetensors": tiny_safetensors(12),
        "unet/diffusion_pytorch_model.non_ema.safetensors": tiny_safetensors(13),
        "unet/diffusion_pytorch_model.bin": b"pickle",
        "text_encoder/config.json": b"{}",
        "text_encoder/model.safetensors": tiny_safetensors(14),
        "text_encoder/pytorch_model.bin": b"pickle",
        "text_encoder/flax_model.msgpack": b"flax",
        "tokenizer/vocab.json": b"{}",
        "tokenizer/merges.txt": b"#version: 0.2",
        "tokenizer/tokenizer_config.json": b"{}",
        "scheduler/scheduler_config.json": b"{}",
        "vae/config.json": b"{}",
        "vae/diffusion_pytorch_model.fp16.safetensors": tiny_safetensors(15),
        "vae/diffusion_pytorch_model.safetensors": tiny_safetensors(16),
    }


DIFFUSERS_PLAIN_FILES = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


def test_diffusers_folder_takes_safetensors_and_configs_only(hub: FakeHub, tmp_path: Path) -> None:
    repo = diffusers_repo()
    hub.repos["tester/tiny-sd"] = repo

    paths = download_model("tester/tiny-sd", tmp_path / "models", progress=False)

    folder = tmp_path / "models" / "Stable-diffusion" / "tiny-sd"
    assert sorted(paths) == sorted(folder / name for name in DIFFUSERS_PLAIN_FILES)
    assert visible_files(folder) == DIFFUSERS_PLAIN_FILES  # hub bookkeeping (.cache/) removed too
    for name in DIFFUSERS_PLAIN_FILES:
        assert (folder / name).read_bytes() == repo[name]
    assert hub.resolve_paths() == DIFFUSERS_PLAIN_FILES  # no .bin, .ckpt, fp16 or root checkpoint fetched


def test_diffusers_folder_variant_and_existing_files(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["tester/tiny-sd"] = diffusers_repo()
    folder = tmp_path / "Stable-diffusion" / "tiny-sd"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_bytes(b'{"mine": true}')
    messages: list[str] = []

    download_model("tester/tiny-sd", tmp_path, variant="fp16", progress=False, on_message=messages.append)

    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (folder / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    # no fp16 text encoder: its plain weights are taken instead
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (folder / "unet" / "config.json").read_bytes() == b'{"mine": true}'
    assert "unet/config.json" not in hub.resolve_paths()
    assert any("already exist" in message for message in messages)


def test_diffusers_component_repo_is_a_folder(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["tester/tiny-vae"] = {
        "config.json": b"{}",
        "diffusion_pytorch_model.safetensors": tiny_safetensors(20),
        "diffusion_pytorch_model.bin": b"pickle",
    }

    paths = download_model("tester/tiny-vae", tmp_path, kind="VAE", progress=False)

    folder = tmp_path / "VAE" / "tiny-vae"
    assert sorted(paths) == [folder / "config.json", folder / "diffusion_pytorch_model.safetensors"]
    assert visible_files(folder) == {"config.json", "diffusion_pytorch_model.safetensors"}


def test_diffusers_folder_with_only_pickled_weights_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["tester/old-sd"] = {
        "model_index.json": b"{}",
        "unet/config.json": b"{}",
        "unet/diffusion_pytorch_model.bin": b"pickle",
    }

    with pytest.raises(DownloadError, match=r"unet.*weights_only=True"):
        download_model("tester/old-sd", tmp_path, progress=False)
    assert hub.resolve_paths() == set()


def test_existing_file_is_skipped_not_overwritten(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["tester/tiny-checkpoint"] = {"tiny.safetensors": tiny_safetensors(0)}
    existing = tmp_path / "Stable-diffusion" / "tiny.safetensors"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"the user's own file")
    messages: list[str] = []

    paths = download_model("tester/tiny-checkpoint", tmp_path, progress=False, on_message=messages.append)

    assert paths == [existing]
    assert existing.read_bytes() == b"the user's own file"
    assert hub.resolve_paths() == set()
    assert len(messages) == 1 and "already exists" in messages[0]

    hub.log.clear()
    named = download_model("tester/tiny-checkpoint", tmp_path, filename="tiny.safetensors", progress=False)
    assert named == [existing]
    assert hub.log == []  # a named file that exists needs no request at all


def test_existing_file_is_skipped_for_plain_urls(hub: FakeHub, tmp_path: Path) -> None:
    hub.files["/files/model.safetensors"] = tiny_safetensors(4)
    existing = tmp_path / "Lora" / "model.safetensors"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"mine")

    paths = download_model(f"{hub.url}/files/model.safetensors", tmp_path, kind="Lora", progress=False)

    assert paths == [existing]
    assert existing.read_bytes() == b"mine"
    assert hub.requests_for("/files/model.safetensors") == []


def test_plain_url_download_resumes_the_part_file(hub: FakeHub, tmp_path: Path) -> None:
    data = tiny_safetensors(5, values=50_000)  # ~200 KB
    hub.files["/files/big.safetensors"] = data
    hub.cut_first_get.add("/files/big.safetensors")
    url = f"{hub.url}/files/big.safetensors"
    part = tmp_path / "Stable-diffusion" / "big.safetensors.part"

    with pytest.raises(DownloadError, match=r"big\.safetensors.*again to resume"):
        download_model(url, tmp_path, progress=False)
    first = hub.requests_for("/files/big.safetensors")
    assert len(first) == 1 and first[0].range_header is None
    assert part.stat().st_size == first[0].bytes_sent == len(data) // 2
    assert not (tmp_path / "Stable-diffusion" / "big.safetensors").exists()

    paths = download_model(url, tmp_path, progress=False)

    second = hub.requests_for("/files/big.safetensors")[1:]
    assert len(second) == 1
    assert second[0].range_header == f"bytes={len(data) // 2}-"
    assert second[0].bytes_sent == len(data) - len(data) // 2  # only the rest was served
    assert paths == [tmp_path / "Stable-diffusion" / "big.safetensors"]
    assert paths[0].read_bytes() == data
    assert not part.exists()


def test_plain_url_complete_part_file_is_finished(hub: FakeHub, tmp_path: Path) -> None:
    data = tiny_safetensors(6)
    hub.files["/files/done.safetensors"] = data
    part = tmp_path / "ESRGAN" / "done.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data)

    paths = download_model(f"{hub.url}/files/done.safetensors", tmp_path, kind="ESRGAN", progress=False)

    assert paths[0].read_bytes() == data
    assert [r.bytes_sent for r in hub.requests_for("/files/done.safetensors")] == [0]


# --- resumable hub downloads ---------------------------------------------------------------------


@pytest.fixture
def progress_bars(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, object]]:
    """(initial, total) of every tqdm bar the downloader opens, drawn or not."""
    import tqdm.auto

    bars: list[tuple[object, object]] = []

    class RecordingTqdm(tqdm.auto.tqdm):  # type: ignore[misc, type-arg]
        def __init__(self, *args: object, **kwargs: object) -> None:
            bars.append((kwargs.get("initial"), kwargs.get("total")))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingTqdm)
    return bars


def part_record(path: Path) -> dict[str, object]:
    return json.loads(path.with_name(path.name + ".part.json").read_text(encoding="utf-8"))


def test_hub_file_download_resumes_where_the_connection_dropped(
    hub: FakeHub, tmp_path: Path, progress_bars: list[tuple[object, object]]
) -> None:
    data = tiny_safetensors(30, values=50_000)  # ~200 KB
    hub.repos["tester/big"] = {"big.safetensors": data}
    hub.cut_hub_file_after["big.safetensors"] = 70_000
    target = tmp_path / "Stable-diffusion"
    destination = target / "big.safetensors"

    with pytest.raises(DownloadError, match=r"tester/big: .*70000 of \d+ bytes.*again to resume"):
        download_model("tester/big", tmp_path, progress=False)
    assert not destination.exists()
    assert (target / "big.safetensors.part").stat().st_size == 70_000
    record = part_record(destination)
    assert (record["etag"], record["commit"], record["size"]) == (
        hashlib.sha256(data).hexdigest(),
        COMMIT,
        len(data),
    )

    paths = download_model("tester/big", tmp_path, progress=True)

    gets = hub.gets_of("big.safetensors")
    assert [(r.range_header, r.bytes_sent) for r in gets] == [
        (None, 70_000),
        ("bytes=70000-", len(data) - 70_000),  # only the missing bytes were asked for and served
    ]
    assert all(f"/resolve/{COMMIT}/" in r.path for r in gets)  # pinned to the listed commit
    assert paths == [destination]
    assert destination.read_bytes() == data
    assert visible_files(target) == {"big.safetensors"}  # no .part or .part.json left
    assert progress_bars[-1] == (70_000, len(data))  # the bar starts at what was already there


def test_hub_part_of_a_changed_file_is_started_over(hub: FakeHub, tmp_path: Path) -> None:
    old, new = tiny_safetensors(31, values=50_000), tiny_safetensors(32, values=50_000)
    hub.repos["tester/big"] = {"big.safetensors": old}
    hub.cut_hub_file_after["big.safetensors"] = 70_000
    with pytest.raises(DownloadError, match="again to resume"):
        download_model("tester/big", tmp_path, progress=False)

    hub.repos["tester/big"]["big.safetensors"] = new  # a new upload: another etag
    paths = download_model("tester/big", tmp_path, progress=False)

    assert [r.range_header for r in hub.gets_of("big.safetensors")] == [None, None]
    assert paths[0].read_bytes() == new
    assert visible_files(tmp_path / "Stable-diffusion") == {"big.safetensors"}


def test_hub_part_without_its_record_is_started_over(hub: FakeHub, tmp_path: Path) -> None:
    data = tiny_safetensors(33)
    hub.repos["tester/tiny"] = {"tiny.safetensors": data}
    part = tmp_path / "Lora" / "tiny.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:100])  # e.g. left by a plain URL download of another file with the same name

    paths = download_model("tester/tiny", tmp_path, kind="Lora", progress=False)

    assert [r.range_header for r in hub.gets_of("tiny.safetensors")] == [None]
    assert paths[0].read_bytes() == data
    assert visible_files(tmp_path / "Lora") == {"tiny.safetensors"}


def write_part(destination: Path, content: bytes, record: dict[str, object]) -> None:
    """What an earlier run leaves: ``<name>.part`` and its ``<name>.part.json``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.with_name(destination.name + ".part").write_bytes(content)
    destination.with_name(destination.name + ".part.json").write_text(json.dumps(record))


def hub_record(repo_id: str, path: str, data: bytes) -> dict[str, object]:
    etag = hashlib.sha256(data).hexdigest()
    return {"repo_id": repo_id, "path": path, "commit": COMMIT, "etag": etag, "size": len(data)}


def test_hub_part_that_is_already_complete_is_checked_and_finished(hub: FakeHub, tmp_path: Path) -> None:
    data = tiny_safetensors(34)
    hub.repos["tester/tiny"] = {"tiny.safetensors": data}
    # Stopped after the last byte but before the rename.
    write_part(
        tmp_path / "Lora" / "tiny.safetensors", data, hub_record("tester/tiny", "tiny.safetensors", data)
    )

    paths = download_model("tester/tiny", tmp_path, kind="Lora", progress=False)

    assert hub.gets_of("tiny.safetensors") == []  # only the metadata was asked for
    assert paths[0].read_bytes() == data
    assert visible_files(tmp_path / "Lora") == {"tiny.safetensors"}


def test_hub_file_with_a_wrong_sha256_is_deleted(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["tester/tiny"] = {"tiny.safetensors": tiny_safetensors(35)}
    hub.etag_overrides["tiny.safetensors"] = hashlib.sha256(b"another file").hexdigest()

    with pytest.raises(DownloadError, match=r"tester/tiny: tiny\.safetensors is damaged: its SHA-256.*again"):
        download_model("tester/tiny", tmp_path, progress=False)

    assert visible_files(tmp_path / "Stable-diffusion") == set()  # no final file, no part to resume


def test_hub_part_longer_than_the_file_is_started_over(hub: FakeHub, tmp_path: Path) -> None:
    data = tiny_safetensors(36)
    hub.repos["tester/tiny"] = {"tiny.safetensors": data}
    record = hub_record("tester/tiny", "tiny.safetensors", data)
    write_part(tmp_path / "VAE" / "tiny.safetensors", data + b"extra", record)

    paths = download_model("tester/tiny", tmp_path, kind="VAE", progress=False)

    assert [r.range_header for r in hub.gets_of("tiny.safetensors")] == [None]
    assert paths[0].read_bytes() == data


def test_resumed_hub_file_is_checked_whole(hub: FakeHub, tmp_path: Path) -> None:
    """The SHA-256 covers the bytes an earlier run wrote, not only the ones fetched now."""
    data = tiny_safetensors(40, values=1_000)
    hub.repos["tester/tiny"] = {"tiny.safetensors": data}
    damaged = data[:1_000] + bytes(1_000)  # right length, wrong bytes at the end of the part
    write_part(
        tmp_path / "Stable-diffusion" / "tiny.safetensors",
        damaged,
        hub_record("tester/tiny", "tiny.safetensors", data),
    )

    with pytest.raises(DownloadError, match="SHA-256"):
        download_model("tester/tiny", tmp_path, progress=False)

    assert [r.range_header for r in hub.gets_of("tiny.safetensors")] == ["bytes=2000-"]
    assert visible_files(tmp_path / "Stable-diffusion") == set()


def test_diffusers_folder_files_resume_one_by_one(hub: FakeHub, tmp_path: Path) -> None:
    repo = diffusers_repo()
    repo["text_encoder/model.safetensors"] = tiny_safetensors(37, values=30_000)
    repo["unet/diffusion_pytorch_model.safetensors"] = tiny_safetensors(38, values=30_000)
    hub.repos["tester/tiny-sd"] = repo
    folder = tmp_path / "Stable-diffusion" / "tiny-sd"

    hub.cut_hub_file_after["text_encoder/model.safetensors"] = 50_000
    with pytest.raises(DownloadError, match="again to resume"):
        download_model("tester/tiny-sd", tmp_path, progress=False)
    assert (folder / "text_encoder" / "model.safetensors.part").stat().st_size == 50_000
    assert not (folder / "model_index.json").exists()  # not a loadable model until every file is there

    hub.cut_hub_file_after["unet/diffusion_pytorch_model.safetensors"] = 60_000
    with pytest.raises(DownloadError, match="again to resume"):
        download_model("tester/tiny-sd", tmp_path, progress=False)
    assert (folder / "text_encoder" / "model.safetensors").read_bytes() == repo[
        "text_encoder/model.safetensors"
    ]

    paths = download_model("tester/tiny-sd", tmp_path, progress=False)

    assert sorted(paths) == sorted(folder / name for name in DIFFUSERS_PLAIN_FILES)
    assert visible_files(folder) == DIFFUSERS_PLAIN_FILES
    for name in DIFFUSERS_PLAIN_FILES:
        assert (folder / name).read_bytes() == repo[name]
    ranges = {name: [r.range_header for r in hub.gets_of(name)] for name in DIFFUSERS_PLAIN_FILES}
    assert ranges.pop("text_encoder/model.safetensors") == [None, "bytes=50000-"]
    assert ranges.pop("unet/diffusion_pytorch_model.safetensors") == [None, "bytes=60000-"]
    assert all(gets == [None] for gets in ranges.values()), ranges  # finished files were not fetched again


def test_lfs_file_via_cdn_resumes_and_keeps_the_token_on_the_hub(hub: FakeHub, tmp_path: Path) -> None:
    data = tiny_safetensors(39, values=50_000)
    hub.repos["tester/private-big"] = {"big.safetensors": data}
    hub.private_tokens["tester/private-big"] = "hf_test_token"
    hub.served_by_cdn.add("big.safetensors")
    hub.cut_hub_file_after["big.safetensors"] = 40_000

    with pytest.raises(DownloadError, match="again to resume"):
        download_model("tester/private-big", tmp_path, token="hf_test_token", progress=False)
    paths = download_model("tester/private-big", tmp_path, token="hf_test_token", progress=False)

    assert paths[0].read_bytes() == data
    cdn_gets = hub.gets_of("big.safetensors")
    assert all("/cdn/" in r.path and r.authorization is None for r in cdn_gets)
    assert [r.range_header for r in cdn_gets] == [None, "bytes=40000-"]
    hub_requests = hub.requests_for(f"/resolve/{COMMIT}/big.safetensors")
    assert {(r.method, r.authorization) for r in hub_requests} == {
        ("HEAD", "Bearer hf_test_token"),
        ("GET", "Bearer hf_test_token"),
    }


def test_plain_url_name_comes_from_content_disposition(hub: FakeHub, tmp_path: Path) -> None:
    data = tiny_safetensors(7)
    hub.files["/api/download/models/4242"] = data
    hub.dispositions["/api/download/models/4242"] = "civitai-style-model.safetensors"

    paths = download_model(f"{hub.url}/api/download/models/4242", tmp_path, kind="Lora", progress=False)

    assert paths == [tmp_path / "Lora" / "civitai-style-model.safetensors"]
    assert paths[0].read_bytes() == data


def test_plain_url_web_page_instead_of_file_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    hub.files["/files/login.safetensors"] = b"<html>please log in</html>"
    hub.html_pages.add("/files/login.safetensors")

    with pytest.raises(DownloadError, match="web page"):
        download_model(f"{hub.url}/files/login.safetensors", tmp_path, progress=False)
    assert not any((tmp_path / "Stable-diffusion").glob("*"))


def test_missing_hub_file_names_the_file(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["tester/tiny"] = {"real.safetensors": tiny_safetensors(8)}

    with pytest.raises(
        DownloadError, match=r"tester/tiny/typo\.safetensors.*'typo\.safetensors'.*real\.safetensors"
    ):
        download_model("tester/tiny/typo.safetensors", tmp_path, progress=False)


def test_missing_repo_says_to_check_the_name(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"nobody/nothing was not found.*check its name"):
        download_model("nobody/nothing", tmp_path, progress=False)


def test_plain_url_404_names_the_url(hub: FakeHub, tmp_path: Path) -> None:
    url = f"{hub.url}/files/gone.safetensors"

    with pytest.raises(DownloadError, match=r"gone\.safetensors.*404.*check the URL"):
        download_model(url, tmp_path, progress=False)


def test_private_repo_needs_a_token(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tiny_safetensors(9)
    hub.repos["tester/private"] = {"secret.safetensors": weights}
    hub.private_tokens["tester/private"] = "hf_test_token"

    with pytest.raises(DownloadError, match="HF_TOKEN"):
        download_model("tester/private", tmp_path, progress=False)

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    paths = download_model("tester/private", tmp_path, progress=False)
    assert paths[0].read_bytes() == weights
    assert [r.authorization for r in hub.gets_of("secret.safetensors")] == ["Bearer hf_test_token"]


def test_unreachable_endpoint_mentions_hf_endpoint(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port on 127.0.0.1 that nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")

    with pytest.raises(DownloadError, match=r"tester/tiny: could not reach .*HF_ENDPOINT"):
        download_model("tester/tiny", tmp_path, progress=False)


def test_offline_flag_is_lifted_only_for_the_download(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    hub.repos["tester/tiny-checkpoint"] = {"tiny.safetensors": tiny_safetensors(0)}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    paths = download_model("tester/tiny-checkpoint", tmp_path, progress=False)

    assert paths[0].is_file()
    assert constants.HF_HUB_OFFLINE is True


@pytest.mark.parametrize(
    "source",
    [
        "tester/tiny/model.ckpt",
        "https://huggingface.co/tester/tiny/resolve/main/model.pt",
        "{url}/files/net.pth",
    ],
)
def test_pickled_files_are_refused_before_any_request(hub: FakeHub, tmp_path: Path, source: str) -> None:
    with pytest.raises(DownloadError, match=r"pickled.*allow_pickle=True.*torch\.load\(weights_only=True\)"):
        download_model(source.format(url=hub.url), tmp_path, kind="ESRGAN", progress=False)
    assert hub.log == []


def test_pickled_file_is_downloaded_when_allowed(hub: FakeHub, tmp_path: Path) -> None:
    hub.files["/files/net.pth"] = b"pickled bytes"

    paths = download_model(
        f"{hub.url}/files/net.pth", tmp_path, kind="ESRGAN", allow_pickle=True, progress=False
    )

    assert paths == [tmp_path / "ESRGAN" / "net.pth"]
    assert paths[0].read_bytes() == b"pickled bytes"


def test_bad_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"Unknown model kind 'Checkpoints'.*Stable-diffusion, VAE, Lora"):
        download_model("tester/tiny", tmp_path, kind="Checkpoints")
    assert canonical_kind("controlnet") == "ControlNet"
    assert {"Stable-diffusion", "VAE", "Lora", "ControlNet", "ESRGAN", "SadTalker"} <= set(MODEL_KINDS)
    assert {"ControlNet/annotators", "SD-Upscaler"} <= set(MODEL_KINDS)


@pytest.mark.parametrize(
    "source", ["", "just-a-name", "/home/me/model.safetensors", "C:\\models\\x.safetensors", "a b/c"]
)
def test_unusable_sources_are_refused(tmp_path: Path, source: str) -> None:
    with pytest.raises(DownloadError):
        download_model(source, tmp_path)


def test_standard_download_command() -> None:
    assert STANDARD_SD15 == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert STANDARD_SD15_FILE == "v1-5-pruned-emaonly.safetensors"
    assert standard_download_command() == (
        "python3 launch.py download stable-diffusion-v1-5/stable-diffusion-v1-5 "
        "--file v1-5-pruned-emaonly.safetensors"
    )
    assert standard_download_command("models/") == standard_download_command()
    assert standard_download_command("/data/sd models").endswith(' --models-dir "/data/sd models"')


def test_import_does_no_work() -> None:
    code = (
        "import sys, pipelines.models.download; "
        "print(sorted(m for m in ('huggingface_hub', 'requests', 'torch', 'tqdm') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
