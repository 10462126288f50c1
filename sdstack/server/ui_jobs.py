"""The web UI's generations: every one is a job row in the durable queue (the native API's submit path), and
its progress comes from the job's events (the same ones the SSE stream sends). No Gradio in here."""

from __future__ import annotations

import asyncio
import base64
import html
import io
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.concurrency import run_in_threadpool

from ..errors import UserError
from .events import TERMINAL_EVENTS
from .jobs import TERMINAL
from .state import AppState

POLL_S = 0.5
log = logging.getLogger(__name__)


@dataclass
class JobView:
    """What the UI shows of a job at one moment."""

    job_id: str
    status: str                      # queued | running | done | failed | cancelled
    step: int = 0
    total: int = 0
    position: int | None = None
    preview: object = None           # a PIL image (live preview) or None
    images: list[str] = field(default_factory=list)   # file paths of the finished images
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    error: str | None = None
    interrupted: bool = False


def image_b64(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def submit(state: AppState, body: dict, init_image=None) -> str:
    """Validate `body` (parameter values, model, vae) exactly as POST /api/v1/jobs does and queue it."""
    from .native import native_job

    body = dict(body)
    if init_image is not None:
        body["init_images"] = [image_b64(init_image)]
    spec = native_job(body, state, source="ui")
    return state.queue.submit(spec)


def _preview(data_uri: str | None):
    if not data_uri:
        return None
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(data_uri.partition(",")[2])))
    img.load()
    return img


def finished_view(state: AppState, job: dict) -> JobView:
    r = job["result"] or {}
    images = [str(state.data.outputs / im["path"]) for im in state.store.images(job["id"])]
    return JobView(job["id"], job["status"], images=images, infotexts=r.get("infotexts") or [],
                   seeds=r.get("seeds") or [], subseeds=r.get("subseeds") or [], error=job["error"],
                   interrupted=bool(r.get("interrupted")))


async def follow(state: AppState, job_id: str) -> AsyncIterator[JobView]:
    """JobViews from submission to the end: queue position, each progress event (with its preview), and
    the finished job last. Events come from the EventHub; the row is re-read when none arrive for a while."""
    q = state.hub.subscribe(job_id)
    view = JobView(job_id, "queued")
    try:
        while True:
            job = state.store.get(job_id)
            if job is None or job["status"] in TERMINAL:
                break
            view.status, view.position = job["status"], state.store.position(job_id)
            yield view
            try:
                ev = await asyncio.wait_for(q.get(), timeout=POLL_S)
            except asyncio.TimeoutError:
                continue
            while True:   # drain what is waiting: show the newest step, never fall behind the worker
                if ev["event"] in TERMINAL_EVENTS:
                    break
                if ev["event"] == "progress":
                    view.status, view.step, view.total = "running", ev["step"], ev["total"]
                    view.preview = _preview(ev.get("preview")) or view.preview
                if q.empty():
                    break
                ev = q.get_nowait()
            if ev["event"] in TERMINAL_EVENTS:
                continue          # the loop re-reads the finished row
            yield view
    finally:
        state.hub.unsubscribe(job_id, q)
    job = state.store.get(job_id)
    if job is not None:
        yield await run_in_threadpool(finished_view, state, job)


def stop(state: AppState, job_id: str | None, how: str) -> str:
    """Interrupt (keep what is done) or skip (the current batch) this session's job; a job still queued is
    cancelled. Jobs of other sessions are never touched."""
    if not job_id:
        return "nothing to stop"
    cur = state.queue.current()
    if cur and cur["job_id"] == job_id:
        ok = state.queue.interrupt() if how == "interrupt" else state.queue.skip()
        return f"{how} requested" if ok else "the job already finished"
    job = state.store.get(job_id)
    if job and job["status"] == "queued" and how == "interrupt":
        state.queue.cancel(job_id)
        return "cancelled while queued"
    return "the job is not running"


def progress_html(view: JobView | None, message: str | None = None) -> str:
    """A progress bar with a line of text; data-status lets tests (and people) see the state."""
    if view is None:
        return f'<div class="sd-progress" data-status="idle"><span>{html.escape(message or "")}</span></div>'
    pct = 100.0 if view.status == "done" else (100.0 * view.step / view.total if view.total else 0.0)
    text = {
        "queued": f"In queue: position {(view.position or 0) + 1}",
        "running": f"Step {view.step}/{view.total}" if view.total else "Loading model...",
        "done": f"Done: {len(view.images)} image(s)" + (" (interrupted)" if view.interrupted else ""),
        "failed": f"Failed: {view.error}",
        "cancelled": "Cancelled",
    }.get(view.status, view.status)
    return (f'<div class="sd-progress" data-status="{view.status}" data-job="{view.job_id}">'
            f'<div class="sd-progress-bar" style="width:{pct:.0f}%"></div>'
            f'<span>{html.escape(message or text)}</span></div>')


def user_error_text(e: Exception) -> str:
    """A user's mistake as its one line; anything else is logged with its traceback and named briefly."""
    if isinstance(e, UserError):
        return str(e)
    log.error("web UI: could not submit a job", exc_info=e)
    return f"internal error ({type(e).__name__}); see the server log"
