"""Download models into SD Studio's A1111-style ``models/`` folder, on explicit user request.

Model *loading* never touches the network; this module is the one place that does, and only when the
user asks (``python launch.py download ...`` or the UI's download button). Sources:

* ``owner/name``: a Hugging Face repo. A diffusers repo (``model_index.json``, or a single diffusers
  component such as a VAE/ControlNet: ``config.json`` + ``diffusion_pytorch_model*.safetensors``) is
  fetched as a folder ``models/<kind>/<name>/``; otherwise the repo's single root ``.safetensors``.
* ``owner/name/path/in/repo.safetensors``, or ``filename=``: one file of a repo.
* ``https://huggingface.co/owner/name/resolve|blob/<rev>/<file>``: the same, via the hub client.
* any other http(s) URL (e.g. Civitai): a plain streaming download that resumes ``<name>.part``.

Hub downloads honour ``HF_ENDPOINT`` (mirrors) and ``HF_TOKEN``, read when the download starts rather
than when ``huggingface_hub`` was imported. huggingface_hub lists the repo and gives each file's size, etag
and commit; the bytes themselves are streamed by this module, the same way as plain URLs, into
``<name>.part`` (with ``<name>.part.json`` recording which version of the file it holds), so running an
interrupted download again asks only for the missing bytes (HTTP Range). huggingface_hub 2.x cannot do
that across runs: it deletes its temporary file when a download fails. Hub files are checked against the
announced size and, for LFS files, the SHA-256 before they are renamed into place. Pickled formats
(``.ckpt``/``.pt``/``.pth``/``.bin``) are refused unless ``allow_pickle=True``: unpickling can execute code.
"""

from __future__ import annotations

import email.message
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from installer.launch_command import launch_command

if TYPE_CHECKING:
    import requests

logger = logging.getLogger(__name__)

# A1111's folder names under models/ (plus SadTalker's, the SD x4 upscaler's and the ControlNet
# annotators'), the only accepted values of ``kind``.
MODEL_KINDS: tuple[str, ...] = (
    "Stable-diffusion",
    "VAE",
    "Lora",
    "LyCORIS",
    "ControlNet",
    "ControlNet/annotators",
    "ESRGAN",
    "RealESRGAN",
    "SwinIR",
    "GFPGAN",
    "Codeformer",
    "hypernetworks",
    "SadTalker",
    "SD-Upscaler",
)

STANDARD_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
STANDARD_SD15_FILE = "v1-5-pruned-emaonly.safetensors"

DEFAULT_HF_ENDPOINT = "https://huggingface.co"

# Suffixes of files that torch.load would unpickle (``.pth.tar`` is an old PyTorch habit).
PICKLED_SUFFIXES: tuple[str, ...] = (".ckpt", ".pt", ".pth", ".pth.tar", ".bin", ".pkl", ".pickle")

_HUB_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
# What a diffusers folder needs besides weights: configs, tokenizer vocabularies, sentencepiece models.
_FOLDER_SUFFIXES = (".json", ".txt", ".model")
_WEIGHT_TOKENS = {
    "safetensors": "safetensors",
    "bin": "pickle",
    "ckpt": "pickle",
    "pt": "pickle",
    "pth": "pickle",
}
_SHARD_PATTERN = re.compile(r"-\d{5}-of-\d{5}")
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?")
_CHUNK_BYTES = 1 << 20
# Hub LFS (and Xet) files have the file's SHA-256 as their etag; git-stored files a 40-hex git blob id.
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONNECT_TIMEOUT_S = 15.0
_READ_TIMEOUT_S = 60.0

MessageCallback = Callable[[str], None]


class DownloadError(RuntimeError):
    """A download could not be done; the message names the source and what to do next."""


@dataclass(frozen=True)
class _HubSource:
    """A Hugging Face repo, or one file of it when ``path`` is set."""

    repo_id: str
    path: str | None
    revision: str | None


@dataclass(frozen=True)
class _UrlSource:
    url: str


@dataclass(frozen=True)
class _Expected:
    """What a finished download must look like, where the source says so (the hub does; URLs don't)."""

    size: int | None = None
    sha256: str | None = None


_NOTHING_EXPECTED = _Expected()


@dataclass(frozen=True)
class _RepoPlan:
    """What to fetch from a repo: one file (``folder`` False) or a diffusers folder's files."""

    files: tuple[str, ...]
    folder: bool


def canonical_kind(kind: str) -> str:
    """Return the ``MODEL_KINDS`` spelling of ``kind`` (matched case-insensitively), or raise."""
    for known in MODEL_KINDS:
        if known.lower() == kind.strip().lower():
            return known
    raise DownloadError(f"Unknown model kind {kind!r}: use one of {', '.join(MODEL_KINDS)}.")


def standard_download_command(models_root_hint: str = "models") -> str:
    """The shell command that downloads the standard SD 1.5 checkpoint (shown when none is installed).

    ``models_root_hint`` is the models folder the user runs SD Studio with; a non-default one is passed
    as ``--models-dir`` so the file lands where the app will look for it.
    """
    command = launch_command("download", STANDARD_SD15, "--file", STANDARD_SD15_FILE)
    hint = models_root_hint.strip()
    if hint and hint.rstrip("/\\") not in ("models", "./models", ".\\models"):
        # Double quotes work in POSIX shells, PowerShell and cmd.exe alike; single quotes don't.
        quoted = hint if re.fullmatch(r"[\w./\\:~-]+", hint) else f'"{hint}"'
        command += f" --models-dir {quoted}"
    return command


def download_model(
    source: str,
    models_root: Path,
    *,
    kind: str = "Stable-diffusion",
    filename: str | None = None,
    revision: str | None = None,
    progress: bool = True,
    token: str | None = None,
    allow_pickle: bool = False,
    variant: str | None = None,
    on_message: MessageCallback | None = None,
) -> list[Path]:
    """Download ``source`` into ``models_root/kind/`` and return the paths of the model's files.

    The returned list holds every file of the model, including ones that were already there: an
    existing file is never overwritten but skipped, and that is reported through ``on_message`` (and
    the log). ``filename`` picks a file of a repo (or names the file of a plain URL download);
    ``revision`` a branch, tag or commit. ``token`` authenticates (default: ``HF_TOKEN`` for the hub;
    plain URLs get it only when passed explicitly, as a Bearer header). ``variant`` picks diffusers
    weights such as ``fp16`` in a folder download; by default the plain weights diffusers loads.
    """
    kind_folder = canonical_kind(kind)
    target_dir = Path(models_root) / kind_folder
    parsed = _parse_source(source, filename=filename, revision=revision)
    say = _messenger(on_message)
    if isinstance(parsed, _UrlSource):
        path = _download_url(
            parsed.url,
            target_dir,
            source=source,
            filename=filename,
            token=token,
            progress=progress,
            allow_pickle=allow_pickle,
            say=say,
        )
        return [path]
    return _download_from_hub(
        parsed,
        target_dir,
        source=source,
        token=token or os.environ.get("HF_TOKEN") or None,
        progress=progress,
        allow_pickle=allow_pickle,
        variant=variant,
        say=say,
    )


# --- source parsing ------------------------------------------------------------------------------


def _parse_source(source: str, *, filename: str | None, revision: str | None) -> _HubSource | _UrlSource:
    text = source.strip()
    if not text:
        raise DownloadError("No model to download: give a Hugging Face repo id (owner/name) or a URL.")
    if re.match(r"(?i)https?://", text):
        hub = _hub_source_from_url(text)
        if hub is None:
            return _UrlSource(text)
        return _with_file_and_revision(hub, source, filename, revision)
    if text.startswith(("/", "./", "../", "~")) or "\\" in text or re.match(r"[A-Za-z]:", text):
        raise DownloadError(
            f"{source!r} looks like a file on this computer: copy it into the models folder instead of "
            "downloading it."
        )
    parts = text.strip("/").split("/")
    if len(parts) < 2 or not all(_REPO_PART.fullmatch(part) for part in parts[:2]):
        raise DownloadError(
            f"{source!r} is neither a Hugging Face repo id (owner/name, optionally followed by "
            "/path/to/file) nor an http(s) URL. To use a file you already have, copy it into the models "
            "folder instead."
        )
    path = "/".join(parts[2:]) or None
    return _with_file_and_revision(
        _HubSource(f"{parts[0]}/{parts[1]}", path, None), source, filename, revision
    )


def _with_file_and_revision(
    hub: _HubSource, source: str, filename: str | None, revision: str | None
) -> _HubSource:
    path = hub.path
    if filename:
        wanted = filename.strip().strip("/")
        if path is not None and path != wanted:
            raise DownloadError(
                f"{source!r} already names the file {path!r} but the file {wanted!r} was asked for too: "
                "give the file only once."
            )
        path = wanted
    return _HubSource(hub.repo_id, path, revision or hub.revision)


def _hub_source_from_url(url: str) -> _HubSource | None:
    """Parse a huggingface.co (or ``HF_ENDPOINT``) web URL into a repo/file, or None for other hosts."""
    parts = urlsplit(url)
    segments = [unquote(segment) for segment in parts.path.split("/") if segment]
    if (parts.hostname or "").lower() not in _HUB_HOSTS:
        # On a mirror's host (HF_ENDPOINT) only the hub's own file-link shape counts as a hub file.
        on_mirror = parts.netloc.lower() == urlsplit(_hub_endpoint()).netloc.lower()
        if not (on_mirror and len(segments) >= 5 and segments[2] in ("resolve", "blob")):
            return None
    if segments and segments[0] in ("datasets", "spaces"):
        raise DownloadError(
            f"{url} is in a Hugging Face {segments[0][:-1]}, not a model repo: give a model URL."
        )
    if len(segments) < 2:
        raise DownloadError(f"{url} does not name a repo: expected {DEFAULT_HF_ENDPOINT}/owner/name/...")
    repo_id = f"{segments[0]}/{segments[1]}"
    rest = segments[2:]
    if not rest:
        return _HubSource(repo_id, None, None)
    if rest[0] in ("resolve", "blob") and len(rest) >= 3:
        return _HubSource(repo_id, "/".join(rest[2:]), rest[1])
    if rest[0] == "tree" and len(rest) == 2:
        return _HubSource(repo_id, None, rest[1])
    raise DownloadError(
        f"{url} is not a file link: use the file's 'resolve' or 'blob' URL, or the repo id {repo_id}."
    )


# --- shared helpers ------------------------------------------------------------------------------


def _messenger(on_message: MessageCallback | None) -> MessageCallback:
    def say(message: str) -> None:
        logger.warning(message)
        if on_message is not None:
            on_message(message)

    return say


def _is_pickled(name: str) -> bool:
    return name.lower().endswith(PICKLED_SUFFIXES)


def _refuse_pickle(name: str, source: str, allow_pickle: bool) -> None:
    if allow_pickle or not _is_pickled(name):
        return
    raise DownloadError(
        f"{source}: {PurePosixPath(name).name} is a pickled PyTorch file (.ckpt/.pt/.pth/.bin). "
        "Unpickling can run arbitrary code, so SD Studio downloads only .safetensors by default: look for "
        "a .safetensors version of this model. If none exists and you trust the source, pass "
        "allow_pickle=True (CLI: --allow-pickle); SD Studio only ever loads such files with "
        "torch.load(weights_only=True)."
    )


def _safe_file_name(name: str, source: str) -> str:
    """Reduce a server- or user-given name to a plain file name that cannot escape the target folder."""
    cleaned = PurePosixPath(name.strip().replace("\\", "/")).name
    if not cleaned or cleaned in (".", "..") or cleaned.startswith(".") or any(ord(c) < 32 for c in cleaned):
        raise DownloadError(
            f"{source}: cannot save a file named {name!r}; give a file name (CLI: --file NAME)."
        )
    return cleaned


def _skip_existing(path: Path, say: MessageCallback) -> None:
    say(f"{path} already exists; not downloading it again (delete it first to re-download).")


def _looks_like_safetensors(path: Path) -> bool:
    """Cheap sanity check: 8-byte little-endian header length, then a JSON object that fits the file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + header_length <= size


# --- Hugging Face hub ----------------------------------------------------------------------------


def _hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


@contextmanager
def _hub_online() -> Iterator[None]:
    """Let huggingface_hub reach the configured endpoint, and only it, for an explicit download's metadata.

    ``HF_HUB_OFFLINE`` is read once when huggingface_hub is imported and then blocks every request. SD
    Studio's loaders work from local files, so a process may well run with it set; a download the user
    asked for must still work, so the flag is lifted here and restored afterwards. Telemetry is switched
    off meanwhile: huggingface_hub 2.x looks up an "agent harness" registry while building its
    user-agent, at the endpoint it saw at import time rather than ``HF_ENDPOINT`` now, and a local
    studio has no reason to send usage data anyway.
    """
    from huggingface_hub import constants

    was_offline = constants.HF_HUB_OFFLINE
    telemetry_was_disabled = constants.HF_HUB_DISABLE_TELEMETRY
    if was_offline:
        logger.info("HF_HUB_OFFLINE is set; lifting it for this explicit download.")
    constants.HF_HUB_OFFLINE = False
    constants.HF_HUB_DISABLE_TELEMETRY = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was_offline
        constants.HF_HUB_DISABLE_TELEMETRY = telemetry_was_disabled


def _download_from_hub(
    hub: _HubSource,
    target_dir: Path,
    *,
    source: str,
    token: str | None,
    progress: bool,
    allow_pickle: bool,
    variant: str | None,
    say: MessageCallback,
) -> list[Path]:
    if hub.path is not None:
        _refuse_pickle(hub.path, source, allow_pickle)
        destination = target_dir / PurePosixPath(hub.path).name
        if destination.exists():  # known before asking the hub: no network needed to skip it
            _skip_existing(destination, say)
            return [destination]
    try:
        import httpx2
        import requests  # noqa: F401  (checked here: the file bytes are streamed with it)
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise DownloadError(
            f"{source}: downloading from Hugging Face needs the huggingface_hub and requests packages; "
            "install them with `pip install -r requirements.txt`."
        ) from exc

    endpoint = _hub_endpoint()
    try:
        with _hub_session(endpoint) as session:
            with _hub_online():
                info = HfApi(endpoint=endpoint, token=token).model_info(hub.repo_id, revision=hub.revision)
            repo_files = [sibling.rfilename for sibling in info.siblings or []]
            # Pin every request to the commit just listed, so the files come from one consistent version.
            commit = info.sha or hub.revision
            plan = _plan_repo_download(
                hub, repo_files, source=source, allow_pickle=allow_pickle, variant=variant
            )
            settings = _HubSettings(
                repo_id=hub.repo_id,
                commit=commit,
                endpoint=endpoint,
                token=token,
                session=session,
                source=source,
                progress=progress,
            )
            if plan.folder:
                folder = target_dir / hub.repo_id.split("/")[1]
                return _download_hub_folder(settings, plan.files, folder, say)
            return [_download_hub_file(settings, plan.files[0], target_dir, say)]
    except DownloadError:
        raise
    except (OSError, httpx2.HTTPError) as exc:
        raise _explain_hub_error(exc, hub, source=source, endpoint=endpoint) from exc


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


def _hub_session(endpoint: str) -> requests.Session:
    """A ``requests`` session that keeps the token on redirects between hub hosts, drops it elsewhere.

    ``requests`` drops the Authorization header whenever a redirect changes host. That is right for the
    CDN that serves LFS files (a signed URL; such storage even refuses a second credential) but wrong when
    ``HF_ENDPOINT`` is e.g. ``https://hf.co``, which redirects to huggingface.co: private and gated files
    would then fail. huggingface_hub trusts the same hosts for its own requests.
    """
    import requests

    hub_origins = {_origin(url) for url in (endpoint, DEFAULT_HF_ENDPOINT, "https://hf.co")}

    class HubSession(requests.Session):
        def should_strip_auth(self, old_url: str, new_url: str) -> bool:
            if _origin(new_url) in hub_origins:
                return False
            return bool(super().should_strip_auth(old_url, new_url))

    return HubSession()


@dataclass(frozen=True)
class _HubSettings:
    """One hub download: the repo pinned to a commit, where and as whom to ask, and how to report."""

    repo_id: str
    commit: str | None
    endpoint: str
    token: str | None
    session: requests.Session
    source: str
    progress: bool


@dataclass(frozen=True)
class _HubFile:
    """One file of the repo at the pinned commit, as the hub describes it (``get_hf_file_metadata``)."""

    path: str
    url: str
    commit: str | None
    etag: str | None
    size: int | None

    @property
    def sha256(self) -> str | None:
        etag = (self.etag or "").lower()
        return etag if _SHA256_HEX.fullmatch(etag) else None

    def state(self, repo_id: str) -> dict[str, object]:
        """What ``<name>.part.json`` records, so a later run can tell whether the part is this file."""
        return {
            "repo_id": repo_id,
            "path": self.path,
            "commit": self.commit,
            "etag": self.etag,
            "size": self.size,
        }


def _plan_repo_download(
    hub: _HubSource, repo_files: list[str], *, source: str, allow_pickle: bool, variant: str | None
) -> _RepoPlan:
    if hub.path is not None:
        if hub.path not in repo_files:
            raise DownloadError(
                f"{source}: the file {hub.path!r} is not in the repo {hub.repo_id}. Check the file name"
                f"{_candidates_hint(repo_files)}."
            )
        return _RepoPlan((hub.path,), folder=False)

    root_files = [name for name in repo_files if "/" not in name]
    is_pipeline = "model_index.json" in root_files
    is_component = "config.json" in root_files and any(
        name.startswith("diffusion_pytorch_model") and name.endswith(".safetensors") for name in root_files
    )
    if is_pipeline or is_component:
        files = _select_folder_files(
            repo_files, pipeline=is_pipeline, allow_pickle=allow_pickle, variant=variant
        )
        blocked = _pickle_only_folders(repo_files, pipeline=is_pipeline)
        if blocked and not allow_pickle:
            raise DownloadError(
                f"{source}: the diffusers folder(s) {', '.join(blocked)} of {hub.repo_id} have only "
                "pickled weights (.bin), no .safetensors. Unpickling can run arbitrary code; if you trust "
                "this repo, pass allow_pickle=True (CLI: --allow-pickle). SD Studio only ever loads such "
                "files with torch.load(weights_only=True)."
            )
        return _RepoPlan(tuple(files), folder=True)

    checkpoints = sorted(name for name in root_files if name.lower().endswith(".safetensors"))
    if len(checkpoints) == 1:
        return _RepoPlan((checkpoints[0],), folder=False)
    if checkpoints:
        raise DownloadError(
            f"{source}: the repo {hub.repo_id} has {len(checkpoints)} .safetensors files; pick one with "
            f"filename= (CLI: --file NAME): {', '.join(checkpoints)}."
        )
    pickled = sorted(name for name in root_files if _is_pickled(name))
    if pickled:
        raise DownloadError(
            f"{source}: the repo {hub.repo_id} has no .safetensors file at its root, only pickled files "
            f"({', '.join(pickled)}). Prefer a .safetensors version of this model; if you trust this one, "
            "pick a file with --file NAME and pass --allow-pickle (it is only ever loaded with "
            "torch.load(weights_only=True))."
        )
    raise DownloadError(
        f"{source}: the repo {hub.repo_id} has neither a .safetensors checkpoint at its root nor a diffusers "
        f"model_index.json; name a file with filename= (CLI: --file PATH){_candidates_hint(repo_files)}."
    )


def _candidates_hint(repo_files: list[str]) -> str:
    weights = sorted(name for name in repo_files if name.lower().endswith(".safetensors"))
    if not weights:
        return ""
    shown = ", ".join(weights[:10]) + (", ..." if len(weights) > 10 else "")
    return f"; its .safetensors files are: {shown}"


def _weight_info(name: str) -> tuple[str | None, str | None]:
    """(format, variant) of a diffusers/transformers weight or weight-index file; format None otherwise.

    ``unet/diffusion_pytorch_model.fp16.safetensors`` -> ("safetensors", "fp16");
    ``text_encoder/model.safetensors.index.json`` -> ("safetensors", None);
    ``vae/diffusion_pytorch_model.bin`` -> ("pickle", None).
    """
    tokens = _SHARD_PATTERN.sub("", PurePosixPath(name).name).split(".")[1:]
    formats = {_WEIGHT_TOKENS[token] for token in tokens if token in _WEIGHT_TOKENS}
    if not formats:
        return None, None
    file_format = "safetensors" if "safetensors" in formats else "pickle"
    extra = [token for token in tokens if token not in _WEIGHT_TOKENS and token not in ("index", "json")]
    return file_format, ".".join(extra) or None


def _folder_members(repo_files: list[str], *, pipeline: bool) -> list[str]:
    """A pipeline is model_index.json plus its component subfolders; root checkpoints are not part of it."""
    if pipeline:
        return [name for name in repo_files if "/" in name or name == "model_index.json"]
    return [name for name in repo_files if "/" not in name]


def _pickle_only_folders(repo_files: list[str], *, pipeline: bool) -> list[str]:
    formats_by_dir: dict[str, set[str]] = {}
    for name in _folder_members(repo_files, pipeline=pipeline):
        file_format, _ = _weight_info(name)
        if file_format is not None:
            formats_by_dir.setdefault(str(PurePosixPath(name).parent), set()).add(file_format)
    return sorted(folder for folder, formats in formats_by_dir.items() if formats == {"pickle"})


def _select_folder_files(
    repo_files: list[str], *, pipeline: bool, allow_pickle: bool, variant: str | None
) -> list[str]:
    """Configs and tokenizer files, plus one set of weights per subfolder.

    Diffusers repos often carry the same weights several times (.bin next to .safetensors, fp16 and
    non_ema variants); only the safetensors of the requested variant (default: none) are taken, falling
    back to the plain weights for a subfolder that lacks that variant.
    """
    selected: list[str] = []
    weights_by_dir: dict[str, list[tuple[str, str, str | None]]] = {}
    for name in _folder_members(repo_files, pipeline=pipeline):
        file_format, file_variant = _weight_info(name)
        if file_format is None:
            if name.lower().endswith(_FOLDER_SUFFIXES):
                selected.append(name)
            continue
        weights_by_dir.setdefault(str(PurePosixPath(name).parent), []).append(
            (name, file_format, file_variant)
        )
    for weights in weights_by_dir.values():
        formats = {file_format for _, file_format, _ in weights}
        wanted_format = "safetensors" if "safetensors" in formats else "pickle"
        if wanted_format == "pickle" and not allow_pickle:
            continue
        candidates = [(name, file_variant) for name, fmt, file_variant in weights if fmt == wanted_format]
        variants = {file_variant for _, file_variant in candidates}
        if variant in variants:
            chosen = variant
        elif None in variants:
            chosen = None
        else:  # only variants, none of them asked for: take one set rather than all of them
            chosen = sorted(v for v in variants if v is not None)[0]
        selected.extend(name for name, file_variant in candidates if file_variant == chosen)
    return sorted(selected)


def _download_hub_file(
    settings: _HubSettings, path_in_repo: str, target_dir: Path, say: MessageCallback
) -> Path:
    destination = target_dir / PurePosixPath(path_in_repo).name
    if destination.exists():
        _skip_existing(destination, say)
        return destination
    _fetch_hub_file(settings, path_in_repo, destination, label=destination.name)
    return destination


def _download_hub_folder(
    settings: _HubSettings, files: tuple[str, ...], folder: Path, say: MessageCallback
) -> list[Path]:
    for name in files:
        if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
            raise DownloadError(
                f"{settings.source}: the repo lists a file named {name!r}, which cannot be saved safely "
                "inside the models folder; not downloading this repo."
            )
    missing = [name for name in files if not (folder / name).exists()]
    present = len(files) - len(missing)
    if present:
        say(f"{folder}: {present} of {len(files)} files already exist; not downloading those again.")
    # The model list recognises a diffusers folder by model_index.json: fetch it last, so an interrupted
    # download does not show up as a model until every file is there.
    for name in sorted(missing, key=lambda name: (name in ("model_index.json", "config.json"), name)):
        _fetch_hub_file(settings, name, folder / name, label=name)
    return [folder / name for name in files]


def _fetch_hub_file(settings: _HubSettings, path_in_repo: str, destination: Path, *, label: str) -> None:
    """Download one repo file into ``destination``, resuming a ``.part`` left by an earlier run.

    huggingface_hub supplies what the hub knows about the file (size, etag, commit) and the auth headers;
    the bytes come from its ``resolve`` URL pinned to the commit. The hub redirects LFS files to a CDN;
    the session (``_hub_session``) sends the token there only if that host is a hub host.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(settings.repo_id, path_in_repo, revision=settings.commit, endpoint=settings.endpoint)
    with _hub_online():  # only around huggingface_hub's own requests, not the (long) byte transfer
        metadata = get_hf_file_metadata(url, token=settings.token, endpoint=settings.endpoint)
        headers = build_hf_headers(token=settings.token)
    headers["Accept-Encoding"] = "identity"  # sizes and Range offsets count the stored bytes
    remote = _HubFile(
        path=path_in_repo,
        url=url,
        commit=metadata.commit_hash or settings.commit,
        etag=metadata.etag,
        size=metadata.size,
    )
    expected = _Expected(size=remote.size, sha256=remote.sha256)
    offset = _hub_resume_offset(destination, remote, settings.repo_id, settings.source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Written before the first byte, so a .part without its .part.json is never ours to resume.
    _write_part_state(destination, remote.state(settings.repo_id), settings.source)
    if remote.size is not None and offset == remote.size:  # the last run got every byte: just check them
        _finish(_part_path(destination), destination, settings.source, expected)
        return
    response = _open_url(settings.session, url, headers, offset, settings.source)
    try:
        _receive(
            response,
            destination,
            offset,
            source=settings.source,
            progress=settings.progress,
            expected=expected,
            label=label,
        )
    finally:
        response.close()


def _hub_resume_offset(destination: Path, remote: _HubFile, repo_id: str, source: str) -> int:
    """Bytes of ``remote`` already in ``<destination>.part``; a part of another version is deleted."""
    part = _part_path(destination)
    if not part.is_file():
        _part_state_path(destination).unlink(missing_ok=True)
        return 0
    offset = part.stat().st_size
    saved = _read_part_state(destination)
    reason = None
    if saved is None:
        reason = "nothing records which file it holds"
    elif not _same_hub_file(saved, remote.state(repo_id)):
        reason = "the file on the hub changed since it was started"
    elif remote.size is not None and offset > remote.size:
        reason = "it is longer than the file on the hub"
    if reason is None:
        if offset:
            logger.info("%s: resuming %s at byte %d.", source, destination.name, offset)
        return offset
    logger.warning("%s: starting %s over: %s (%s).", source, destination.name, reason, part)
    _discard_part(destination)
    return 0


def _same_hub_file(saved: dict[str, object], current: dict[str, object]) -> bool:
    """Same etag and size: same bytes. Without etags (some mirrors), the same path at the same commit."""
    if saved.get("size") != current.get("size"):
        return False
    if saved.get("etag") and current.get("etag"):
        return saved["etag"] == current["etag"]
    return all(saved.get(key) == current.get(key) for key in ("repo_id", "path", "commit"))


def _part_state_path(destination: Path) -> Path:
    return destination.with_name(destination.name + ".part.json")


def _read_part_state(destination: Path) -> dict[str, object] | None:
    try:
        state = json.loads(_part_state_path(destination).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _write_part_state(destination: Path, state: dict[str, object], source: str) -> None:
    try:
        _part_state_path(destination).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise DownloadError(
            f"{source}: could not write {_part_state_path(destination)} ({exc}); check that the models "
            "folder is writable and has free space."
        ) from exc


def _discard_part(destination: Path) -> None:
    _part_path(destination).unlink(missing_ok=True)
    _part_state_path(destination).unlink(missing_ok=True)


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(exc: BaseException) -> int | None:
    for error in _exception_chain(exc):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _explain_hub_error(exc: BaseException, hub: _HubSource, *, source: str, endpoint: str) -> DownloadError:
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token_hint = "set HF_TOKEN (or pass a token, CLI: --token) with a token that can read it"
    status = _http_status(exc)
    chain = list(_exception_chain(exc))
    what = f"the file {hub.path!r} of {hub.repo_id}" if hub.path else hub.repo_id
    if any(isinstance(error, GatedRepoError) for error in chain):
        message = (
            f"{hub.repo_id} is gated: open {endpoint}/{hub.repo_id} in a browser, accept its terms, then "
            f"{token_hint}."
        )
    elif any(isinstance(error, RepositoryNotFoundError) for error in chain):
        message = (
            f"the repo {hub.repo_id} was not found on {endpoint}: check its name (owner/name). If it is "
            f"private or gated, {token_hint}."
        )
    elif any(isinstance(error, RevisionNotFoundError) for error in chain):
        message = f"{hub.repo_id} has no revision {hub.revision!r}: check the branch, tag or commit."
    elif any(isinstance(error, RemoteEntryNotFoundError) for error in chain) or status == 404:
        message = f"{what} was not found (HTTP 404): check the file name."
    elif status in (401, 403):
        message = f"{endpoint} refused access to {what} (HTTP {status}): {token_hint}."
    elif any(isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError)) for error in chain):
        message = (
            f"could not reach {endpoint} ({exc}). Check your internet connection; where huggingface.co is "
            "blocked or slow, set HF_ENDPOINT to the URL of a Hugging Face mirror."
        )
    elif status is not None and status >= 500:
        message = f"{endpoint} answered HTTP {status}: try again later, or use a mirror via HF_ENDPOINT."
    else:
        message = f"downloading {what} failed: {exc}"
    return DownloadError(f"{source}: {message}")


# --- plain URLs ----------------------------------------------------------------------------------


def _name_from_url(url: str) -> str | None:
    """The file name at the end of a URL's path, if it looks like one (has an extension)."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    return name if "." in name.strip(".") else None


def _name_from_response(response: requests.Response) -> str | None:
    disposition = response.headers.get("Content-Disposition")
    if disposition:
        parsed = email.message.Message()
        parsed["Content-Disposition"] = disposition
        name = parsed.get_filename()
        if name:
            return name
    return _name_from_url(response.url)


def _download_url(
    url: str,
    target_dir: Path,
    *,
    source: str,
    filename: str | None,
    token: str | None,
    progress: bool,
    allow_pickle: bool,
    say: MessageCallback,
) -> Path:
    try:
        import requests
    except ImportError as exc:
        raise DownloadError(
            f"{source}: URL downloads need the requests package; run `pip install requests`."
        ) from exc

    headers = {"Accept-Encoding": "identity", "User-Agent": "sd-studio"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    known_name = filename or _name_from_url(url)
    with requests.Session() as session:
        if known_name is not None:
            name = _safe_file_name(known_name, source)
            _refuse_pickle(name, source, allow_pickle)
            destination = target_dir / name
            if destination.exists():
                _skip_existing(destination, say)
                return destination
            offset = _url_resume_offset(destination, source)
            response = _open_url(session, url, headers, offset, source)
        else:
            # No name in the URL (e.g. Civitai's /api/download/models/<id>): the server names the file.
            response = _open_url(session, url, headers, 0, source)
            try:
                name = _safe_file_name(_name_from_response(response) or "", source)
            except DownloadError:
                response.close()
                raise
            destination = target_dir / name
            offset = _url_resume_offset(destination, source)
            refused = _is_pickled(name) and not allow_pickle
            if refused or destination.exists() or offset:
                response.close()
                _refuse_pickle(name, source, allow_pickle)
                if destination.exists():
                    _skip_existing(destination, say)
                    return destination
                response = _open_url(session, url, headers, offset, source)
        try:
            _receive(response, destination, offset, source=source, progress=progress)
        finally:
            response.close()
    return destination


def _part_path(destination: Path) -> Path:
    return destination.with_name(destination.name + ".part")


def _url_resume_offset(destination: Path, source: str) -> int:
    """Bytes already in ``<destination>.part``; a part that a hub download left (it has a ``.part.json``)
    holds a file this URL may not serve, so it is started over rather than spliced."""
    part = _part_path(destination)
    if _part_state_path(destination).exists():
        if part.is_file():
            logger.warning("%s: starting %s over: it was begun by a Hugging Face download.", source, part)
        _discard_part(destination)
        return 0
    return part.stat().st_size if part.is_file() else 0


def _open_url(
    session: requests.Session, url: str, headers: dict[str, str], offset: int, source: str
) -> requests.Response:
    import requests

    request_headers = dict(headers)
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    host = urlsplit(url).hostname or url
    try:
        response = session.get(
            url, headers=request_headers, stream=True, timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S)
        )
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise DownloadError(
            f"{source}: could not reach {host} ({exc}). Check your internet connection and proxy settings "
            "(HTTPS_PROXY); for Hugging Face files, HF_ENDPOINT can point at a mirror."
        ) from exc
    except requests.RequestException as exc:
        raise DownloadError(f"{source}: the request failed ({exc}); check the URL.") from exc
    if response.status_code == 416 and offset:
        return response  # handled by _receive: the .part may already be complete
    if response.status_code >= 400:
        response.close()
        raise DownloadError(f"{source}: {_explain_http_status(response.status_code)}")
    return response


def _explain_http_status(status: int) -> str:
    if status in (401, 403):
        return (
            f"the server refused access (HTTP {status}): the file needs a login. Pass an API token for that "
            "site (token=, CLI: --token)."
        )
    if status == 404:
        return "the file was not found (HTTP 404): check the URL."
    if status >= 500:
        return f"the server failed (HTTP {status}): try again later."
    return f"the server answered HTTP {status}: check the URL."


def _content_range(response: requests.Response) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``Content-Range: bytes a-b/total`` or ``bytes */total``."""
    match = re.fullmatch(
        r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", response.headers.get("Content-Range", "").strip()
    )
    if match is None:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total and total != "*" else None)


def _receive(
    response: requests.Response,
    destination: Path,
    offset: int,
    *,
    source: str,
    progress: bool,
    expected: _Expected = _NOTHING_EXPECTED,
    label: str | None = None,
) -> None:
    """Stream ``response`` into ``<destination>.part`` (appending from ``offset``), check it, rename it.

    ``expected`` is what the source announced (the hub: size and SHA-256); it takes precedence over the
    response's own length headers. A part that cannot be right any more is deleted; one that merely
    stopped early is kept for the next run to resume.
    """
    part = _part_path(destination)
    if response.status_code == 416:
        _, total = _content_range(response)
        if total != offset:
            _discard_part(destination)
            raise DownloadError(
                f"{source}: the partial file {part.name} does not match the file on the server any more; "
                "it was deleted. Run the download again to start over."
            )
        _finish(part, destination, source, expected)
        return
    total: int | None
    if response.status_code == 206:
        first, total = _content_range(response)
        if first != offset:
            _discard_part(destination)
            raise DownloadError(
                f"{source}: the server resumed at the wrong place; {part.name} was deleted. Run the download "
                "again to start over."
            )
    else:
        if offset:
            logger.info("%s: the server cannot resume downloads; starting %s over.", source, destination.name)
        offset = 0
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
    if expected.size is not None:
        total = expected.size
    if response.headers.get("Content-Type", "").lower().startswith("text/html"):
        raise DownloadError(
            f"{source}: the server sent a web page instead of the file. The link may need a login (pass a "
            "token, CLI: --token) or may not be a direct download link."
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    if total is not None:
        _check_free_space(destination, total - offset, source)
    received, digest = _stream_to_part(
        response,
        part,
        offset,
        total,
        source=source,
        progress=progress,
        hash_sha256=expected.sha256 is not None,
        label=label or destination.name,
    )
    if total is not None and received < total:
        raise DownloadError(
            f"{source}: the download stopped after {received} of {total} bytes; run the same download again "
            "to resume it."
        )
    _finish(part, destination, source, expected, digest)


_FREE_SPACE_MARGIN_BYTES = 64 * 1024**2


def _check_free_space(destination: Path, remaining: int, source: str) -> None:
    """Refuse a download that cannot fit, before the first byte, saying how much is needed and free."""
    import shutil

    try:
        free = shutil.disk_usage(destination.parent).free
    except OSError:
        return  # some network drives cannot say; the write itself will report a full disk
    if free >= remaining + _FREE_SPACE_MARGIN_BYTES:
        return
    raise DownloadError(
        f"{source}: {destination.name} needs {remaining / 1e9:.2f} GB more and only {free / 1e9:.2f} GB are "
        f"free on the disk holding {destination.parent}. Free up space and run the same download again "
        "(it resumes)."
    )


def _stream_to_part(
    response: requests.Response,
    part: Path,
    offset: int,
    total: int | None,
    *,
    source: str,
    progress: bool,
    hash_sha256: bool = False,
    label: str,
) -> tuple[int, str | None]:
    """Append the response body to ``part`` (rewrite it when ``offset`` is 0); return the part's size and,
    with ``hash_sha256``, the SHA-256 of the whole part, computed while the bytes arrive."""
    import requests
    import urllib3.exceptions
    from tqdm.auto import tqdm

    hasher = hashlib.sha256() if hash_sha256 else None
    if hasher is not None and offset:
        _hash_file_prefix(hasher, part, offset, source)
    received = offset
    bar = tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        disable=not progress,
    )
    try:
        with part.open("ab" if offset else "wb") as handle:
            while True:
                try:
                    # read1 hands over what has arrived, so a dropped connection keeps every received byte.
                    chunk = response.raw.read1(_CHUNK_BYTES, decode_content=True)
                except (
                    requests.RequestException,
                    urllib3.exceptions.HTTPError,
                    ConnectionError,
                    TimeoutError,
                ) as exc:
                    raise DownloadError(
                        f"{source}: the connection broke after {received}"
                        f"{f' of {total}' if total is not None else ''} bytes ({exc}). Run the same download "
                        "again to resume it."
                    ) from exc
                if not chunk:
                    break
                handle.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except OSError as exc:
        raise DownloadError(f"{source}: could not write {part} ({exc}); check free disk space.") from exc
    finally:
        bar.close()
    return received, (hasher.hexdigest() if hasher is not None else None)


def _hash_file_prefix(hasher: Any, path: Path, length: int, source: str) -> None:
    """Feed the first ``length`` bytes of ``path`` to ``hasher`` (the part an earlier run wrote)."""
    try:
        with path.open("rb") as handle:
            remaining = length
            while remaining:
                chunk = handle.read(min(_CHUNK_BYTES * 8, remaining))
                if not chunk:
                    break
                hasher.update(chunk)
                remaining -= len(chunk)
    except OSError as exc:
        raise DownloadError(
            f"{source}: could not read {path} ({exc}); delete it and run the download again."
        ) from exc


def _file_sha256(path: Path, source: str) -> str:
    hasher = hashlib.sha256()
    _hash_file_prefix(hasher, path, path.stat().st_size, source)
    return hasher.hexdigest()


def _finish(
    part: Path,
    destination: Path,
    source: str,
    expected: _Expected = _NOTHING_EXPECTED,
    sha256: str | None = None,
) -> None:
    """Check the complete ``part`` against ``expected``, then rename it to ``destination``.

    ``sha256`` is the part's digest when the caller computed it while streaming; otherwise it is computed
    here if ``expected`` has one. A part that fails a check is deleted: resuming it cannot fix it.
    """
    size = part.stat().st_size
    if expected.size is not None and size != expected.size:
        _discard_part(destination)
        raise DownloadError(
            f"{source}: {destination.name} came out at {size} bytes, not the {expected.size} bytes the hub "
            "announced; it was deleted. Run the same download again; if this repeats, the mirror "
            "(HF_ENDPOINT) or a proxy is changing the file."
        )
    if expected.sha256 is not None:
        actual = sha256 or _file_sha256(part, source)
        if actual != expected.sha256:
            _discard_part(destination)
            raise DownloadError(
                f"{source}: {destination.name} is damaged: its SHA-256 is {actual}, but the hub publishes "
                f"{expected.sha256}. It was deleted; run the same download again. If this repeats, the "
                "mirror (HF_ENDPOINT) or a proxy is changing the file."
            )
    if destination.name.lower().endswith(".safetensors") and not _looks_like_safetensors(part):
        _discard_part(destination)
        raise DownloadError(
            f"{source}: what the server sent is not a .safetensors file (often an error or login page); "
            "it was deleted. Check the URL, or pass a token if the site needs a login."
        )
    if destination.exists():
        raise DownloadError(
            f"{source}: {destination} appeared while downloading; kept it, the download is in {part}."
        )
    os.replace(part, destination)
    _part_state_path(destination).unlink(missing_ok=True)
