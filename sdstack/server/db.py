"""The server's SQLite database: jobs, their input images, generated images (with FTS5 search), settings.

WAL mode with `synchronous=FULL`: a committed job row survives a crash of the process (or the machine).
Connections are per thread; writers use `BEGIN IMMEDIATE` so a read-then-write never races another writer.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import sqlite3
import threading
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- FIFO order
    id          TEXT NOT NULL UNIQUE,               -- public id
    kind        TEXT NOT NULL,                      -- txt2img | img2img
    source      TEXT NOT NULL,                      -- a1111 | native | resubmit
    status      TEXT NOT NULL,                      -- queued | running | done | failed | cancelled
    params      TEXT NOT NULL,                      -- JSON: validated generation parameters, seeds resolved
    model       TEXT NOT NULL,                      -- checkpoint path
    vae         TEXT,                               -- VAE path, NULL = the model's own
    request     TEXT NOT NULL,                      -- JSON: the request as received
    result      TEXT,                               -- JSON: seeds, infotexts, model facts, interrupted
    error       TEXT,
    note        TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS job_inputs (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx    INTEGER NOT NULL,
    png    BLOB NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS images (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id          TEXT NOT NULL REFERENCES jobs(id),
    idx             INTEGER NOT NULL,
    state           TEXT NOT NULL,                  -- pending (name reserved) | done (file complete)
    path            TEXT NOT NULL UNIQUE,           -- relative to the outputs folder, '/'-separated
    seed            INTEGER NOT NULL,
    subseed         INTEGER,
    prompt          TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    params          TEXT NOT NULL,                  -- JSON, re-submittable as a native job
    infotext        TEXT NOT NULL,
    model_name      TEXT,
    model_hash      TEXT,
    vae_name        TEXT,
    file_sha256     TEXT,
    width           INTEGER,
    height          INTEGER,
    created_at      TEXT NOT NULL,
    UNIQUE (job_id, idx)
);
CREATE INDEX IF NOT EXISTS images_by_job ON images(job_id);
CREATE INDEX IF NOT EXISTS images_by_created ON images(created_at);
CREATE VIRTUAL TABLE IF NOT EXISTS images_fts USING fts5(
    prompt, negative_prompt, content='images', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS images_ai AFTER INSERT ON images BEGIN
    INSERT INTO images_fts(rowid, prompt, negative_prompt) VALUES (new.id, new.prompt, new.negative_prompt);
END;
CREATE TRIGGER IF NOT EXISTS images_ad AFTER DELETE ON images BEGIN
    INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt)
        VALUES ('delete', old.id, old.prompt, old.negative_prompt);
END;
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL                             -- JSON
);
"""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Database:
    """One SQLite file; `conn()` gives this thread's connection, `write()` an immediate transaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def open(self) -> "Database":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self.conn()
        conn.executescript(SCHEMA)
        return self

    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def write(self):
        """An IMMEDIATE transaction on this thread's connection: committed on success, rolled back on error."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()
