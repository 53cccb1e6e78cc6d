"""A durable job store on SQLite (WAL): a job is recorded before it is acknowledged.

After a crash or restart, jobs that were queued run as usual, jobs that were running are
queued again (their partial outputs removed first, so nothing is duplicated), and finished
jobs keep their results.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED_STATES = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    outputs TEXT NOT NULL DEFAULT '[]',
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
"""


_NEXT_JOB_SQL = """
    SELECT j.* FROM jobs j
    JOIN (SELECT owner, MIN(seq) AS first FROM jobs WHERE state = 'queued' GROUP BY owner) q
      ON j.seq = q.first
    LEFT JOIN (SELECT owner, MAX(started) AS last FROM jobs
               WHERE started IS NOT NULL GROUP BY owner) s
      ON s.owner = j.owner
    ORDER BY COALESCE(s.last, 0), j.seq
    LIMIT 1
"""
"""The next job in fair order: round-robin between owners, each owner's jobs in submission order."""


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    kind: str
    request: dict[str, Any]
    state: JobState
    created: float
    started: float | None
    finished: float | None
    attempts: int
    outputs: list[str]
    result: dict[str, Any] | None
    error: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        return cls(
            id=row["id"],
            owner=row["owner"],
            kind=row["kind"],
            request=json.loads(row["request"]),
            state=row["state"],
            created=row["created"],
            started=row["started"],
            finished=row["finished"],
            attempts=row["attempts"],
            outputs=json.loads(row["outputs"]),
            result=json.loads(row["result"]) if row["result"] else None,
            error=row["error"],
        )


class JobStore:
    """Thread-safe access to the jobs table (one connection, serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # writing -------------------------------------------------------------------------------------
    def add(
        self, owner: str, kind: str, request: dict[str, Any], *, max_queued: int | None = None
    ) -> str | None:
        """Record a queued job and return its id; None when ``max_queued`` jobs already wait."""
        job_id = uuid.uuid4().hex
        with self._transaction() as db:
            if max_queued is not None:
                (waiting,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
                if waiting >= max_queued:
                    return None
            db.execute(
                "INSERT INTO jobs (id, owner, kind, request, state, created) "
                "VALUES (?, ?, ?, ?, 'queued', ?)",
                (job_id, owner, kind, json.dumps(request), time.time()),
            )
        return job_id

    def peek_next(self) -> JobRecord | None:
        """The job :meth:`claim_next` would take now, left queued (the dispatcher first checks
        that a worker that suits it is free)."""
        with self._lock:
            row = self._db.execute(_NEXT_JOB_SQL).fetchone()
        return JobRecord.from_row(row) if row is not None else None

    def claim_next(self) -> JobRecord | None:
        """Take the next job fairly: round-robin between owners (the owner served least recently
        goes first), each owner's jobs in submission order."""
        with self._transaction() as db:
            row = db.execute(_NEXT_JOB_SQL).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1, error = NULL "
                "WHERE id = ?",
                (time.time(), row["id"]),
            )
        return self.get(row["id"])

    def record_output(self, job_id: str, path: str) -> None:
        """Remember an output file as soon as it is written (so a crash can clean it up)."""
        with self._transaction() as db:
            row = db.execute("SELECT outputs FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                outputs = [*json.loads(row["outputs"]), path]
                db.execute("UPDATE jobs SET outputs = ? WHERE id = ?", (json.dumps(outputs), job_id))

    def finish(
        self, job_id: str, state: JobState, *, result: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, finished = ?, result = ?, error = ? WHERE id = ?",
                (state, time.time(), json.dumps(result) if result is not None else None, error, job_id),
            )

    def cancel_queued(self, job_id: str) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state = 'queued'",
                (time.time(), job_id),
            )
            return cursor.rowcount == 1

    def recover(self, max_attempts: int | None = None) -> tuple[list[str], list[str]]:
        """After a crash or restart: running jobs go back to the queue, their partial outputs
        deleted so the rerun does not duplicate them; a job that was already cut short
        ``max_attempts`` times is marked failed instead (it probably stopped the studio itself).
        Returns ``(requeued ids, failed ids)``."""
        requeued: list[str] = []
        failed: list[str] = []
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state = 'running'").fetchall()
        for row in rows:
            reason = "the studio stopped while it ran"
            if self.requeue_after_crash(row["id"], reason, max_attempts=max_attempts) == "queued":
                requeued.append(row["id"])
            else:
                failed.append(row["id"])
        return requeued, failed

    def requeue_after_crash(self, job_id: str, reason: str, *, max_attempts: int | None = None) -> str | None:
        """A running job whose worker died: queue it again (partial outputs deleted), or, after
        ``max_attempts`` runs, mark it failed with ``reason``. Returns the new state (None if the
        job was not running)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT outputs, attempts FROM jobs WHERE id = ? AND state = 'running'", (job_id,)
            ).fetchone()
            if row is None:
                return None
            for path in json.loads(row["outputs"]):
                Path(path).unlink(missing_ok=True)
            if max_attempts is not None and row["attempts"] >= max_attempts:
                error = cut_short_error(row["attempts"], reason)
                db.execute(
                    "UPDATE jobs SET state = 'failed', finished = ?, outputs = '[]', error = ? WHERE id = ?",
                    (time.time(), error, job_id),
                )
                return "failed"
            db.execute(
                "UPDATE jobs SET state = 'queued', started = NULL, outputs = '[]', error = ? WHERE id = ?",
                (f"retrying: {reason}", job_id),
            )
            return "queued"

    # reading -------------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord.from_row(row) if row else None

    def queued_ids(self) -> list[str]:
        """Queued job ids in the order they will run (fair order simulated)."""
        with self._lock:
            rows = self._db.execute(
                """
                SELECT j.id, j.owner, COALESCE(s.last, 0) AS last FROM jobs j
                LEFT JOIN (SELECT owner, MAX(started) AS last FROM jobs
                           WHERE started IS NOT NULL GROUP BY owner) s
                  ON s.owner = j.owner
                WHERE j.state = 'queued' ORDER BY j.seq
                """
            ).fetchall()
        per_owner: dict[str, list[str]] = {}
        last: dict[str, float] = {}
        first_seen: dict[str, int] = {}
        for index, row in enumerate(rows):  # rows come in submission order
            per_owner.setdefault(row["owner"], []).append(row["id"])
            last[row["owner"]] = row["last"]
            first_seen.setdefault(row["owner"], index)
        order: list[str] = []
        owners = sorted(per_owner, key=lambda owner: (last[owner], first_seen[owner]))
        while any(per_owner.values()):
            for owner in owners:
                if per_owner[owner]:
                    order.append(per_owner[owner].pop(0))
        return order

    def active_requests(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The requests of queued and running jobs (of ``kind`` only, when given), e.g. to tell
        which staged uploads are still needed."""
        query = "SELECT request FROM jobs WHERE state IN ('queued', 'running')"
        params: tuple[Any, ...] = ()
        if kind is not None:
            query += " AND kind = ?"
            params = (kind,)
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        return [json.loads(row["request"]) for row in rows]

    def list(self, *, owner: str | None = None, limit: int = 100) -> list[JobRecord]:
        query = "SELECT * FROM jobs"
        params: tuple[Any, ...] = ()
        if owner is not None:
            query += " WHERE owner = ?"
            params = (owner,)
        query += " ORDER BY seq DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*params, limit)).fetchall()
        return [JobRecord.from_row(row) for row in rows]

    def counts_by_state(self) -> dict[str, int]:
        """How many jobs are in each state (monitoring)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {str(row["state"]): int(row["n"]) for row in rows}

    def owner_of_output(self, path: str | Path) -> str | None:
        """The owner of the newest job that wrote ``path`` (its recorded outputs, result images or
        talking-head sidecar), or None when no job did. ``path`` matches as given and resolved."""
        candidates = sorted({str(path), str(Path(path).resolve())})
        marks = ", ".join("?" for _ in candidates)
        query = f"""
            SELECT owner FROM jobs
            WHERE EXISTS (SELECT 1 FROM json_each(jobs.outputs) WHERE value IN ({marks}))
               OR (result IS NOT NULL AND (
                   EXISTS (SELECT 1 FROM json_each(jobs.result, '$.images') WHERE value IN ({marks}))
                   OR json_extract(jobs.result, '$.info.sidecar') IN ({marks})))
            ORDER BY seq DESC LIMIT 1
        """
        with self._lock:
            row = self._db.execute(query, (*candidates, *candidates, *candidates)).fetchone()
        return str(row["owner"]) if row else None


LOST_PC_WORDS = ("left the cluster", "unreachable")


def cut_short_error(attempts: int, reason: str) -> str:
    """Why a job that was cut short ``attempts`` times is not run again, with a next step: a lost PC
    is not the job's fault; a worker dying under the job probably ran out of memory."""
    times = "once" if attempts == 1 else f"{attempts} times"
    if any(words in reason for words in LOST_PC_WORDS):
        return (
            f"This job was cut short {times} (last: {reason}); it was not run again. "
            "Submit it again once the studio's PCs are steady."
        )
    return (
        f"This job stopped its worker {times} ({reason}), probably by running out of "
        "memory; it was not retried. Try a smaller size, batch or upscale factor."
    )
