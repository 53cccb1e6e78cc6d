"""What the Discord front end must not forget across a restart: pending requests and usage.

``data/discord.sqlite3`` holds each /draw until it is answered (the interaction token, the channel,
the user and, once queued, the job id), so a studio restarted mid-job still answers, through the
token while it lasts and the bot in the channel after that. The token is cleared once answered.
The daily quota is counted here too, so a restart does not hand out a fresh quota.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    interaction_id TEXT PRIMARY KEY,
    application_id TEXT NOT NULL,
    token TEXT,
    channel_id TEXT,
    user_id TEXT NOT NULL,
    preset TEXT NOT NULL,
    job_id TEXT,
    created REAL NOT NULL,
    answered INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS usage (
    user_id TEXT NOT NULL,
    day TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (user_id, day)
);
"""


@dataclass(frozen=True)
class PendingDraw:
    interaction_id: str
    application_id: str
    token: str | None
    channel_id: str | None
    user_id: str
    preset: str
    job_id: str | None
    created: float


def utc_day(now: float) -> str:
    return datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%d")


class DiscordStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # pending draws ---------------------------------------------------------------------------
    def add(self, draw: PendingDraw) -> bool:
        """Record a new /draw; False when that interaction was already recorded (a duplicate)."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO pending (interaction_id, application_id, token, channel_id, user_id, "
                "preset, job_id, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    draw.interaction_id,
                    draw.application_id,
                    draw.token,
                    draw.channel_id,
                    draw.user_id,
                    draw.preset,
                    draw.job_id,
                    draw.created,
                ),
            )
            return cursor.rowcount == 1

    def set_job(self, interaction_id: str, job_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE pending SET job_id = ? WHERE interaction_id = ?", (job_id, interaction_id)
            )

    def answered(self, interaction_id: str) -> None:
        """The request was answered: forget its token."""
        with self._lock:
            self._db.execute(
                "UPDATE pending SET answered = 1, token = NULL WHERE interaction_id = ?", (interaction_id,)
            )

    def get(self, interaction_id: str) -> PendingDraw | None:
        with self._lock:
            row = self._db.execute(
                "SELECT interaction_id, application_id, token, channel_id, user_id, preset, job_id, created "
                "FROM pending WHERE interaction_id = ?",
                (interaction_id,),
            ).fetchone()
        return PendingDraw(*row) if row else None

    def unanswered(self) -> list[PendingDraw]:
        with self._lock:
            rows = self._db.execute(
                "SELECT interaction_id, application_id, token, channel_id, user_id, preset, job_id, created "
                "FROM pending WHERE answered = 0 ORDER BY created"
            ).fetchall()
        return [PendingDraw(*row) for row in rows]

    def is_answered(self, interaction_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT answered FROM pending WHERE interaction_id = ?", (interaction_id,)
            ).fetchone()
        return bool(row and row[0])

    # quota -----------------------------------------------------------------------------------
    def used_today(self, user_id: str, now: float | None = None) -> int:
        day = utc_day(time.time() if now is None else now)
        with self._lock:
            row = self._db.execute(
                "SELECT count FROM usage WHERE user_id = ? AND day = ?", (user_id, day)
            ).fetchone()
        return int(row[0]) if row else 0

    def take_quota(self, user_id: str, limit: int, now: float | None = None) -> bool:
        """Count one picture against today's quota; False (nothing counted) when it is used up."""
        day = utc_day(time.time() if now is None else now)
        with self._lock:
            row = self._db.execute(
                "SELECT count FROM usage WHERE user_id = ? AND day = ?", (user_id, day)
            ).fetchone()
            used = int(row[0]) if row else 0
            if limit and used >= limit:
                return False
            self._db.execute(
                "INSERT INTO usage (user_id, day, count) VALUES (?, ?, 1) "
                "ON CONFLICT(user_id, day) DO UPDATE SET count = count + 1",
                (user_id, day),
            )
            return True

    def give_back_quota(self, user_id: str, now: float | None = None) -> None:
        """Undo one count (the picture could not even be queued)."""
        day = utc_day(time.time() if now is None else now)
        with self._lock:
            self._db.execute(
                "UPDATE usage SET count = MAX(count - 1, 0) WHERE user_id = ? AND day = ?", (user_id, day)
            )
