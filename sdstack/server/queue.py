"""The job queue: durable rows in SQLite (jobs.py) and ONE worker thread that runs them in FIFO order.

Why only one job touches a model at a time: the worker thread started by `JobQueue.start` is the only
code that loads models or calls `generate`. HTTP handlers only insert rows (`submit`) and read state; they
never hold a model. The worker claims the oldest `queued` row (`ORDER BY seq`) inside an IMMEDIATE
transaction, runs it to the end, then claims the next. A second server process on the same data folder
is refused at start-up by an exclusive lock file (app.py), so there is never a second worker either.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from .jobs import JobSpec, JobStore

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What the worker is doing now (read by /progress and the progress streams)."""

    job_id: str
    kind: str
    n_iter: int
    control: object
    started: float = field(default_factory=time.monotonic)
    timestamp: str = field(default_factory=lambda: _dt.datetime.now().strftime("%Y%m%d%H%M%S"))
    step: int = 0
    total: int = 0
    iteration: int = 0
    preview_png: bytes | None = None
    last_preview: float = 0.0
    cancelled: bool = False
    interrupted: bool = False
    skipped: bool = False

    def snapshot(self) -> dict:
        return {"job_id": self.job_id, "kind": self.kind, "n_iter": self.n_iter, "step": self.step,
                "total": self.total, "iteration": self.iteration, "elapsed": time.monotonic() - self.started,
                "timestamp": self.timestamp, "preview_png": self.preview_png, "interrupted": self.interrupted,
                "skipped": self.skipped, "cancelled": self.cancelled}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class JobQueue:
    def __init__(self, store: JobStore, runner, *, publish: Callable[[str, dict], None] | None = None,
                 preview_interval: float = 1.0, outputs=None, max_attempts: int = 3):
        self.store = store
        self.runner = runner
        self.publish = publish or (lambda job_id, event: None)
        self.preview_interval = preview_interval
        self.outputs = outputs
        self.max_attempts = max_attempts
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._current: RunState | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> list[str]:
        """Recover from a previous crash, then start the worker. Returns the ids of re-queued jobs."""
        recovered = self.store.recover(self.outputs, self.max_attempts) if self.outputs is not None else []
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sdstack-worker", daemon=True)
        self._thread.start()
        return recovered

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running job; a job interrupted by the stop goes back to the queue."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            if self._current is not None:
                self._current.control.interrupt.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ called from request handlers

    def submit(self, spec: JobSpec) -> str:
        job_id = self.store.insert(spec)
        self.publish(job_id, {"event": "queued", "job_id": job_id})
        self._wake.set()
        return job_id

    def current(self) -> dict | None:
        with self._lock:
            return self._current.snapshot() if self._current else None

    def interrupt(self) -> bool:
        with self._lock:
            if self._current is None:
                return False
            self._current.interrupted = True
            self._current.control.interrupt.set()
            return True

    def skip(self) -> bool:
        with self._lock:
            if self._current is None:
                return False
            self._current.skipped = True
            self._current.control.skip.set()
            return True

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued job at once, or a running one at its next step. Returns the resulting status."""
        if self.store.cancel_queued(job_id):
            self.publish(job_id, {"event": "cancelled", "job_id": job_id})
            return "cancelled"
        with self._lock:
            if self._current is not None and self._current.job_id == job_id:
                self._current.cancelled = True
                self._current.control.interrupt.set()
                return "cancelling"
        job = self.store.get(job_id)
        return job["status"] if job else None

    # ------------------------------------------------------------------ the worker thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim_next()
            except Exception:  # a locked or broken database must not kill the worker
                log.exception("cannot claim the next job")
                self._stop.wait(1.0)
                continue
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception:  # e.g. the database went away while recording the outcome
                log.exception("job %s: could not record its outcome; it is re-run after a restart", job["id"])

    def _run(self, job: dict) -> None:
        from ..engine.generate import Control

        p = job["params"]
        state = RunState(job["id"], job["kind"], int(p.get("n_iter", 1)), Control())
        with self._lock:   # stop() sets _stop before taking this lock: either we see it, or it sees us
            if self._stop.is_set():
                self.store.requeue(job["id"], "re-queued: the server was stopped before this job started")
                return
            self._current = state
        self.publish(job["id"], {"event": "started", "job_id": job["id"], "attempt": job["attempts"]})
        try:
            self._execute(job, state)
        finally:
            with self._lock:
                self._current = None

    def _execute(self, job: dict, state: RunState) -> None:
        job_id = job["id"]
        try:
            result, facts = self.runner.run(job, state.control, lambda pr: self._on_step(state, pr))
            if state.cancelled:
                self.store.finish(job_id, "cancelled", note="cancelled while running")
                self.publish(job_id, {"event": "cancelled", "job_id": job_id})
                return
            if self._stop.is_set() and result.interrupted:
                self.store.requeue(job_id, "re-queued: the server was stopped while this job was running")
                return
            ids, hashes = self.runner.save(job, result, facts)
            summary = self._summary(result, facts, ids, state)
            self.store.finish(job_id, "done", result=summary, hashes=hashes)
            self.publish(job_id, {"event": "done", "job_id": job_id, "images": ids,
                                  "interrupted": result.interrupted})
        except UserError as e:
            self._fail(job_id, str(e), e.field, e.status)
        except Exception as e:  # noqa: BLE001 - the worker must survive any one job
            log.exception("job %s failed", job_id)
            self._fail(job_id, f"internal error: {type(e).__name__}: {e}", None, 500)

    def _fail(self, job_id: str, message: str, field_name: str | None, status: int) -> None:
        self.store.finish(job_id, "failed", result={"field": field_name, "status": status}, error=message)
        self.publish(job_id, {"event": "failed", "job_id": job_id, "error": message, "field": field_name})

    @staticmethod
    def _summary(result, facts: dict, ids: list[int], state: RunState) -> dict:
        w, h = (result.images[0].size if result.images else (None, None))
        return dict(facts, seeds=result.seeds, subseeds=result.subseeds, infotexts=result.infotexts,
                    interrupted=result.interrupted, image_ids=ids, width=w, height=h,
                    job_timestamp=state.timestamp)

    def _on_step(self, state: RunState, progress) -> None:
        state.step, state.total, state.iteration = progress.step, progress.total, progress.iteration
        event = {"event": "progress", "job_id": state.job_id, "step": progress.step, "total": progress.total,
                 "iteration": progress.iteration}
        now = time.monotonic()
        if state.preview_png is None or now - state.last_preview >= self.preview_interval \
                or progress.step == progress.total:
            try:
                png = _png(progress.preview())
            except Exception:  # noqa: BLE001 - a preview is never worth failing a job
                log.debug("preview failed", exc_info=True)
            else:
                state.preview_png, state.last_preview = png, now
                event["preview"] = "data:image/png;base64," + base64.b64encode(png).decode()
        self.publish(state.job_id, event)
