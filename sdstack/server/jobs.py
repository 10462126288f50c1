"""Job and image rows: the durable half of the queue (see queue.py for the worker).

Life of a job: `queued` (row committed before anyone waits on it) -> `running` (claimed in FIFO order by the
one worker) -> `done` | `failed` | `cancelled`. Its images are first *reserved* (rows in state `pending` with
their final file names), then written atomically, then marked `done` in the same transaction that finishes
the job. So after a crash a job is either finished with all its files, or still `running` with only pending
rows, whose files `recover()` deletes before the job is queued again.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .db import Database, now_iso

log = logging.getLogger(__name__)

TERMINAL = ("done", "failed", "cancelled")
_TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # metadata.images.save_image_atomic's temp names


@dataclass
class JobSpec:
    kind: str                       # txt2img | img2img
    source: str                     # a1111 | native | resubmit
    params: dict                    # validated GenerationParams as a dict, seeds resolved
    model: str                      # checkpoint path
    vae: str | None = None
    request: dict = field(default_factory=dict)
    init_pngs: list[bytes] = field(default_factory=list)


@dataclass
class ImagePlan:
    idx: int
    path: str                       # relative to outputs
    seed: int
    subseed: int
    infotext: str
    width: int
    height: int


def _job_dict(row) -> dict:
    d = dict(row)
    for key in ("params", "request", "result"):
        d[key] = json.loads(d[key]) if d.get(key) else None
    return d


class JobStore:
    def __init__(self, db: Database):
        self.db = db

    # ------------------------------------------------------------------ submitting and reading

    def insert(self, spec: JobSpec) -> str:
        job_id = uuid.uuid4().hex
        with self.db.write() as c:
            c.execute("INSERT INTO jobs(id, kind, source, status, params, model, vae, request, created_at) "
                      "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                      (job_id, spec.kind, spec.source, json.dumps(spec.params), spec.model, spec.vae,
                       json.dumps(spec.request), now_iso()))
            c.executemany("INSERT INTO job_inputs(job_id, idx, png) VALUES (?, ?, ?)",
                          [(job_id, i, png) for i, png in enumerate(spec.init_pngs)])
        return job_id

    def get(self, job_id: str) -> dict | None:
        row = self.db.conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_dict(row) if row else None

    def list(self, status: str | None = None, limit: int = 50) -> list[dict]:
        sql, args = "SELECT * FROM jobs", []
        if status:
            sql, args = sql + " WHERE status = ?", [status]
        rows = self.db.conn().execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [_job_dict(r) for r in rows]

    def position(self, job_id: str) -> int | None:
        """0-based place among queued jobs (0 = next to run), None if not queued."""
        row = self.db.conn().execute(
            "SELECT (SELECT COUNT(*) FROM jobs q WHERE q.status = 'queued' AND q.seq < j.seq) AS pos, j.status "
            "FROM jobs j WHERE j.id = ?", (job_id,)).fetchone()
        return row["pos"] if row and row["status"] == "queued" else None

    def count(self, status: str) -> int:
        return self.db.conn().execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def inputs(self, job_id: str) -> list[bytes]:
        rows = self.db.conn().execute("SELECT png FROM job_inputs WHERE job_id = ? ORDER BY idx", (job_id,))
        return [bytes(r["png"]) for r in rows]

    def images(self, job_id: str) -> list[dict]:
        rows = self.db.conn().execute(
            "SELECT * FROM images WHERE job_id = ? AND state = 'done' ORDER BY idx", (job_id,)).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------ the worker's transitions

    def claim_next(self) -> dict | None:
        """The oldest queued job, now marked running (attempts + 1); None when the queue is empty."""
        with self.db.write() as c:
            row = c.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            c.execute("UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ? WHERE id = ?",
                      (now_iso(), row["id"]))
        return self.get(row["id"])

    def cancel_queued(self, job_id: str) -> bool:
        with self.db.write() as c:
            cur = c.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?, note = 'cancelled while queued' "
                            "WHERE id = ? AND status = 'queued'", (now_iso(), job_id))
        return cur.rowcount == 1

    def reserve_images(self, job: dict, plans: list[ImagePlan], facts: dict) -> list[int]:
        """Pending image rows holding the final file names (written next, then `finish` marks them done)."""
        p = job["params"]
        ids = []
        with self.db.write() as c:
            for plan in plans:
                params = dict(p, seed=plan.seed, subseed=plan.subseed, width=plan.width, height=plan.height,
                              batch_size=1, n_iter=1)
                cur = c.execute(
                    "INSERT INTO images(job_id, idx, state, path, seed, subseed, prompt, negative_prompt, params, "
                    "infotext, model_name, model_hash, vae_name, width, height, created_at) "
                    "VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job["id"], plan.idx, plan.path, plan.seed, plan.subseed, p["prompt"], p["negative_prompt"],
                     json.dumps(params), plan.infotext, facts.get("model_name"), facts.get("model_hash"),
                     facts.get("vae_name"), plan.width, plan.height, now_iso()))
                ids.append(cur.lastrowid)
        return ids

    def discard_pending(self, job_id: str, outputs: Path) -> None:
        """Delete the reserved (unfinished) images of a job, files and rows (a save that failed half-way)."""
        rows = self.db.conn().execute("SELECT id, path FROM images WHERE job_id = ? AND state = 'pending'",
                                      (job_id,)).fetchall()
        for row in rows:
            _unlink_inside(outputs, row["path"])
        with self.db.write() as c:
            c.executemany("DELETE FROM images WHERE id = ?", [(r["id"],) for r in rows])

    def requeue(self, job_id: str, note: str) -> None:
        """Put a running job back at its place in the queue (the server is shutting down); a clean stop does
        not count as an attempt."""
        with self.db.write() as c:
            c.execute("UPDATE jobs SET status = 'queued', started_at = NULL, note = ?, attempts = attempts - 1 "
                      "WHERE id = ? AND status = 'running'", (note, job_id))

    def finish(self, job_id: str, status: str, result: dict | None = None, hashes: dict[int, str] | None = None,
               error: str | None = None, note: str | None = None) -> None:
        """One transaction: the job's final status and its images marked done with their file hashes.

        Init images stay in job_inputs so a gallery image made by img2img can be re-submitted."""
        with self.db.write() as c:
            for image_id, sha in (hashes or {}).items():
                c.execute("UPDATE images SET state = 'done', file_sha256 = ? WHERE id = ?", (sha, image_id))
            c.execute("UPDATE jobs SET status = ?, result = ?, error = ?, note = COALESCE(?, note), "
                      "finished_at = ? WHERE id = ?",
                      (status, json.dumps(result) if result is not None else None, error, note, now_iso(), job_id))

    # ------------------------------------------------------------------ after a crash

    def recover(self, outputs: Path, max_attempts: int) -> list[str]:
        """Undo half-finished work of a previous process; re-queue (or fail) jobs that were running.

        Returns the ids of the jobs that were running. Runs before the worker starts."""
        conn = self.db.conn()
        pending = conn.execute("SELECT id, path FROM images WHERE state = 'pending'").fetchall()
        for row in pending:
            _unlink_inside(outputs, row["path"])
        running = [dict(r) for r in conn.execute("SELECT id, attempts FROM jobs WHERE status = 'running'")]
        with self.db.write() as c:
            c.executemany("DELETE FROM images WHERE id = ?", [(r["id"],) for r in pending])
            for job in running:
                if job["attempts"] >= max_attempts:
                    c.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                              (now_iso(), f"the server stopped while running this job {job['attempts']} times; "
                               "not retried again", job["id"]))
                else:
                    c.execute("UPDATE jobs SET status = 'queued', started_at = NULL, note = ? WHERE id = ?",
                              (f"re-queued: the server stopped while this job was running "
                               f"(attempt {job['attempts']})", job["id"]))
        _remove_temp_files(outputs)
        if running or pending:
            log.warning("recovered %d interrupted job(s), removed %d unfinished image(s)", len(running), len(pending))
        return [j["id"] for j in running]


def _unlink_inside(outputs: Path, rel: str) -> None:
    path = (outputs / rel).resolve()
    if path.is_relative_to(outputs.resolve()) and path.is_file():
        path.unlink()


def _remove_temp_files(outputs: Path) -> None:
    """Temp files of an atomic save that a killed process never renamed (only sdstack's own pattern)."""
    for sub in ("txt2img-images", "img2img-images"):
        folder = outputs / sub
        if not folder.is_dir():
            continue
        for day in folder.iterdir():
            if day.is_dir():
                for f in day.iterdir():
                    if _TEMP_FILE.match(f.name) and f.is_file():
                        f.unlink()
