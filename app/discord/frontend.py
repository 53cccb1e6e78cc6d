"""The one /draw handler both Discord connections use.

A /draw is recorded (``data/discord.sqlite3``) and acknowledged at once, whatever the queue holds;
the rest happens on a thread of its own: rate limit and daily quota, the preset (asked for, else the
channel's, else ``default``), the attachment (allowed hosts only, size cap, decoded to be sure it is
a photo), then the job goes on the studio's durable queue as ``discord:<user id>``. While it waits
and runs, the deferred message shows its place and progress (edits throttled, 429s honoured); at
the end the message is edited to carry the picture and its seed, or, once the interaction token
has expired (15 minutes), the bot posts the picture in the channel. Users only ever see short
messages; the details go to the studio's log.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.discord.api import AttachmentError, DiscordApi, DiscordHttpError, Picture
from app.discord.config import DiscordConfig
from app.discord.store import DiscordStore, PendingDraw
from app.presets import (
    PhotoError,
    Preset,
    PresetModelMissingError,
    PresetNotFoundError,
    PresetStore,
    PromptRefusedError,
    submit_preset_job,
)
from pipelines.errors import StudioError

if TYPE_CHECKING:
    from app.jobs.queue import JobStatus
    from app.services import StudioServices

log = logging.getLogger(__name__)

TOKEN_MARGIN_SECONDS = 30.0
"""Edit through the token only while it has at least this long left; later, post in the channel."""
WATCH_POLL_SECONDS = 1.0
STORE_FILE = "discord.sqlite3"


@dataclass(frozen=True)
class Attachment:
    url: str
    filename: str = "photo"
    size: int | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class DrawCommand:
    """A /draw as either connection receives it."""

    interaction_id: str
    application_id: str
    token: str
    user_id: str
    channel_id: str | None
    prompt: str
    preset: str | None = None
    photo: Attachment | None = None


def owner_for(user_id: str) -> str:
    return f"discord:{user_id}"


class RateLimiter:
    """At most ``limit`` commands per user within ``window`` seconds (kept in memory)."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def try_take(self, user_id: str) -> float | None:
        """None when allowed (and counted), else the seconds until the next one is."""
        now = self.clock()
        with self._lock:
            recent = self._recent.setdefault(user_id, deque())
            while recent and now - recent[0] >= self.window:
                recent.popleft()
            if len(recent) >= self.limit:
                return max(0.0, self.window - (now - recent[0]))
            recent.append(now)
            return None


class DiscordFrontEnd:
    def __init__(
        self,
        services: StudioServices,
        config: DiscordConfig,
        *,
        api: DiscordApi | None = None,
        store: DiscordStore | None = None,
        presets: PresetStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.services = services
        self.config = config
        self.api = api or DiscordApi(config)
        self.store = store or DiscordStore(Path(services.settings.data_dir) / STORE_FILE)
        self.presets = presets
        self.clock = clock
        self.rate = RateLimiter(config.rate_limit, config.rate_window_seconds)
        self._stopping = threading.Event()
        self._active: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def preset_store(self) -> PresetStore:
        return self.presets or PresetStore.for_services(self.services)

    # accepting -----------------------------------------------------------------------------------
    def accept(self, draw: DrawCommand) -> bool:
        """Record a /draw (fast: no network, no queue); False when it was already recorded."""
        pending = PendingDraw(
            interaction_id=draw.interaction_id,
            application_id=draw.application_id,
            token=draw.token,
            channel_id=draw.channel_id,
            user_id=draw.user_id,
            preset=self.config.preset_for(draw.channel_id, draw.preset),
            job_id=None,
            created=self.clock(),
        )
        return self.store.add(pending)

    def start(self, draw: DrawCommand) -> threading.Thread | None:
        """Work on an accepted /draw on a thread of its own (call after the deferral was sent)."""
        return self._spawn(draw.interaction_id, self._process, draw)

    def resume(self) -> list[str]:
        """After a restart: watch the jobs of unanswered requests again (and tell those whose photo
        never reached the queue to send it again). The interaction ids taken up."""
        resumed = []
        for pending in self.store.unanswered():
            if pending.job_id:
                self._spawn(pending.interaction_id, self._watch_and_answer, pending)
            else:
                self._spawn(
                    pending.interaction_id,
                    self._answer_text,
                    pending,
                    "The studio restarted before your photo was queued. Please send /draw again.",
                )
            resumed.append(pending.interaction_id)
        return resumed

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        for thread in list(self._threads):
            thread.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the work under way (tests, and an orderly shutdown)."""
        for thread in list(self._threads):
            thread.join(timeout)

    def _spawn(self, interaction_id: str, target: Callable[..., None], *args: Any) -> threading.Thread | None:
        with self._lock:
            if interaction_id in self._active:
                return None
            self._active.add(interaction_id)

        def run() -> None:
            try:
                target(*args)
            except Exception:
                log.exception("Discord request %s failed", interaction_id)
                pending = self.store.get(interaction_id)
                if pending is not None and not self.store.is_answered(interaction_id):
                    self._answer_text(pending, "Sorry, something went wrong. Please try again later.")
            finally:
                with self._lock:
                    self._active.discard(interaction_id)

        thread = threading.Thread(target=run, name=f"discord-{interaction_id}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return thread

    # the work --------------------------------------------------------------------------------------
    def _process(self, draw: DrawCommand) -> None:
        pending = self.store.get(draw.interaction_id)
        if pending is None:
            return
        message = self._queue_draw(draw, pending)
        if message is not None:
            self._answer_text(pending, message)
            return
        pending = self.store.get(draw.interaction_id) or pending
        self._watch_and_answer(pending)

    def _queue_draw(self, draw: DrawCommand, pending: PendingDraw) -> str | None:
        """Check and queue the drawing; a short message for the user when it cannot be."""
        wait = self.rate.try_take(draw.user_id)
        if wait is not None:
            return (
                f"Slow down: at most {self.config.rate_limit} drawings every "
                f"{self.config.rate_window_seconds:g} seconds. Try again in {max(1, round(wait))} s."
            )
        presets = self.preset_store()
        try:
            preset = presets.load(pending.preset)
        except PresetNotFoundError:
            return f"There is no preset '{pending.preset}' here."
        except StudioError as exc:
            log.error("Discord: preset %s cannot be used: %s", pending.preset, exc)
            return f"The preset '{pending.preset}' is not ready; please tell the organisers."
        photo = None
        if draw.photo is not None:
            try:
                photo = self._download(draw.photo)
            except AttachmentError as exc:
                return str(exc)
        elif preset.needs_photo:
            return "Attach a photo to /draw (JPEG, PNG, WebP or HEIC)."
        if self.config.daily_quota and not self.store.take_quota(draw.user_id, self.config.daily_quota):
            return f"You have used your {self.config.daily_quota} drawings for today. Come back tomorrow!"
        try:
            _, job_id = submit_preset_job(
                self.services,
                presets,
                preset.name,
                draw.prompt,
                photo,
                owner=owner_for(draw.user_id),
            )
        except PromptRefusedError as exc:
            self.store.give_back_quota(draw.user_id)
            return str(exc)
        except PhotoError:
            self.store.give_back_quota(draw.user_id)
            return "That file is not a photo I can read. Send a JPEG, PNG, WebP or HEIC photo."
        except PresetModelMissingError as exc:
            self.store.give_back_quota(draw.user_id)
            log.error("Discord: %s", exc)
            return f"The preset '{preset.name}' is not ready; please tell the organisers."
        except StudioError as exc:
            self.store.give_back_quota(draw.user_id)
            from app.jobs.queue import QueueFullError

            if isinstance(exc, QueueFullError):
                return "The studio is very busy right now. Please try again in a few minutes."
            log.error("Discord: could not queue a drawing: %s", exc)
            return "Sorry, that drawing could not be started. Please try again later."
        self.store.set_job(draw.interaction_id, job_id)
        return None

    def _download(self, attachment: Attachment) -> bytes:
        cap = self.config.max_attachment_bytes
        if attachment.size is not None and attachment.size > cap:
            raise AttachmentError(f"The photo is larger than {cap / 2**20:g} MB.")
        return self.api.fetch_attachment(attachment.url, cap)

    def _watch_and_answer(self, pending: PendingDraw) -> None:
        assert pending.job_id is not None
        queue = self.services.queue
        last_text: str | None = None
        next_edit = 0.0
        while not self._stopping.is_set():
            try:
                status = queue.wait(pending.job_id, timeout=WATCH_POLL_SECONDS)
            except KeyError:
                self._answer_text(pending, "Sorry, your drawing was lost. Please send /draw again.")
                return
            if status.finished:
                self._answer_result(pending, status)
                return
            text = progress_text(status)
            now = time.monotonic()
            if text != last_text and now >= next_edit and self._token_usable(pending):
                try:
                    self.api.edit_original(pending.application_id, pending.token or "", text, patient=False)
                    last_text = text
                    next_edit = now + self.config.progress_every_seconds
                except DiscordHttpError as exc:
                    if exc.status == 429:
                        next_edit = now + (exc.retry_after or 1.0)
                    else:
                        log.info("Discord progress edit failed: %s", exc)
                        next_edit = now + max(self.config.progress_every_seconds, 5.0)

    def _answer_result(self, pending: PendingDraw, status: JobStatus) -> None:
        mention = f"<@{pending.user_id}>"
        if status.state == "cancelled":
            self._answer_text(pending, f"{mention} your drawing was cancelled.")
            return
        if status.state != "done" or not status.images:
            log.error("Discord: job %s %s: %s", status.id, status.state, status.error)
            self._answer_text(
                pending, f"{mention} sorry, that drawing failed. Try another photo or other words."
            )
            return
        path = Path(status.images[0])
        seed = result_seed(status)
        if self._needs_screening(pending.preset):
            from app.safety_checker import screen_files

            if screen_files(self.services.settings.models_dir, [path])[0]:
                self._answer_text(
                    pending, f"{mention} the safety checker held this picture back. Try other words."
                )
                return
        picture = Picture(path.read_bytes(), f"draw-{seed if seed is not None else 'image'}.png")
        text = f"{mention} here is your picture (preset {pending.preset}, seed {seed})"
        self._answer(pending, text, picture)

    def _needs_screening(self, name: str) -> bool:
        try:
            preset: Preset = self.preset_store().load(name)
        except StudioError:
            return False
        return preset.safety_checker

    # answering -------------------------------------------------------------------------------------
    def _token_usable(self, pending: PendingDraw) -> bool:
        age = self.clock() - pending.created
        return bool(pending.token) and age < self.config.token_lifetime_seconds - TOKEN_MARGIN_SECONDS

    def _answer_text(self, pending: PendingDraw, text: str) -> None:
        self._answer(pending, text, None)

    def _answer(self, pending: PendingDraw, text: str, picture: Picture | None) -> None:
        """Edit the deferred response while its token lasts; after that (or if Discord no longer
        knows it) post in the channel with the bot. Marked answered either way."""
        try:
            if self._token_usable(pending):
                try:
                    self.api.edit_original(pending.application_id, pending.token or "", text, picture=picture)
                    return
                except DiscordHttpError as exc:
                    if exc.status not in (401, 403, 404):
                        raise
                    log.info("Discord: interaction token refused (%s); posting in the channel", exc.status)
            if pending.channel_id and self.config.bot_token_value():
                self.api.post_in_channel(pending.channel_id, text, picture=picture)
            else:
                log.error(
                    "Discord: request %s expired and no bot token/channel to answer in",
                    pending.interaction_id,
                )
        except DiscordHttpError as exc:
            log.error("Discord: could not answer request %s: %s", pending.interaction_id, exc)
        finally:
            self.store.answered(pending.interaction_id)


_shared: dict[int, tuple[weakref.ref[Any], DiscordFrontEnd]] = {}
"""id(services) -> (the services, their front end); keyed by id because services are unhashable."""
_shared_lock = threading.Lock()


def shared_frontend(services: StudioServices, config: DiscordConfig) -> DiscordFrontEnd:
    """The one front end of a studio process, resumed once. The HTTP interactions route and the
    gateway bot may both be up in one process (``launch.py bot`` also serves the UI and the API);
    two front ends would each take up the requests a restart left and answer them twice."""
    with _shared_lock:
        for key, (owner, _) in list(_shared.items()):
            if owner() is None:
                del _shared[key]
        entry = _shared.get(id(services))
        frontend = entry[1] if entry is not None and entry[0]() is services else None
        if frontend is None:
            frontend = DiscordFrontEnd(services, config)
            _shared[id(services)] = (weakref.ref(services), frontend)
            taken_up = frontend.resume()
            if taken_up:
                log.info("Discord: answering %d request(s) left from before the restart", len(taken_up))
        return frontend


def progress_text(status: JobStatus) -> str:
    if status.state == "queued":
        return f"Queued: {status.position} in line" if status.position else "Queued"
    if status.steps:
        return f"Drawing: step {status.step}/{status.steps}"
    return "Drawing: starting"


def result_seed(status: JobStatus) -> int | None:
    info = status.info or {}
    seeds = info.get("all_seeds") or []
    if seeds:
        return int(seeds[0])
    seed = info.get("seed")
    return int(seed) if seed is not None else None


def draw_from_payload(payload: dict[str, Any]) -> DrawCommand:
    """A /draw from an interaction's JSON (HTTP interactions; the gateway builds it from discord.py)."""
    data = payload.get("data") or {}
    options = {str(o.get("name")): o.get("value") for o in data.get("options") or [] if isinstance(o, dict)}
    user = (payload.get("member") or {}).get("user") or payload.get("user") or {}
    channel_id = payload.get("channel_id") or (payload.get("channel") or {}).get("id")
    photo = None
    attachment_id = options.get("photo")
    if attachment_id is not None:
        raw = ((data.get("resolved") or {}).get("attachments") or {}).get(str(attachment_id)) or {}
        if raw.get("url"):
            photo = Attachment(
                url=str(raw["url"]),
                filename=str(raw.get("filename") or "photo"),
                size=int(raw["size"]) if raw.get("size") is not None else None,
                content_type=raw.get("content_type"),
            )
    return DrawCommand(
        interaction_id=str(payload.get("id")),
        application_id=str(payload.get("application_id")),
        token=str(payload.get("token") or ""),
        user_id=str(user.get("id") or "unknown"),
        channel_id=str(channel_id) if channel_id else None,
        prompt=str(options.get("prompt") or ""),
        preset=str(options["preset"]) if options.get("preset") else None,
        photo=photo,
    )
