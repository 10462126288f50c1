"""sdstack's own API under /api/v1: jobs (submit, inspect, cancel, progress stream), the gallery, and the
file route /outputs/... that serves generated images and nothing else."""

# (no `from __future__ import annotations`: FastAPI must see the locally built request models)

import asyncio
import dataclasses
import json
from pathlib import Path

from fastapi import APIRouter, Body, HTTPException, Query
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import UserError
from ..params import PARAMS, PARAMS_BY_NAME
from . import gallery
from .events import TERMINAL_EVENTS
from .jobs import TERMINAL, JobSpec
from .schemas import ImageList, ImageRecord, JobCreated, JobInfo, native_job_model
from .state import AppState
from .submit import check_networks, check_size, fix_seeds, init_pngs, validated_params

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
KEEPALIVE_S = 15.0


def native_job(body: dict, state: AppState, source: str = "native", pngs: list[bytes] | None = None) -> JobSpec:
    values = {p.name: body[p.name] for p in PARAMS if body.get(p.name) is not None}
    params = validated_params(values)
    check_size(params, state.config.max_pixels)
    check_networks(params, state.loras)
    if body.get("init_images"):
        pngs = init_pngs(body["init_images"], "init_images", state.config.max_pixels)
    model = state.catalog.resolve_model(body["model"], field="model") if body.get("model") \
        else state.options.model_path()
    vae = state.catalog.resolve_vae(body["vae"], field="vae") if body.get("vae") is not None \
        else state.options.vae_path()
    request = dict(body, init_images=None)
    return JobSpec(kind="img2img" if pngs else "txt2img", source=source,
                   params=dataclasses.asdict(fix_seeds(params)), model=str(model), vae=str(vae) if vae else None,
                   request=request, init_pngs=pngs or [])


def job_info(state: AppState, job: dict) -> dict:
    cur = state.queue.current()
    progress = None
    if cur and cur["job_id"] == job["id"]:
        progress = {"step": cur["step"], "total": cur["total"], "iteration": cur["iteration"]}
    images = [gallery.image_record(r) for r in state.store.images(job["id"])] if job["status"] == "done" else []
    return dict(job, position=state.store.position(job["id"]), progress=progress, images=images)


def _created(state: AppState, job_id: str) -> dict:
    return {"id": job_id, "status": "queued", "position": state.store.position(job_id),
            "url": f"/api/v1/jobs/{job_id}", "events": f"/api/v1/jobs/{job_id}/events"}


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def event_stream(state: AppState, job_id: str):
    """status first, then progress (with previews) ... and one final done / failed / cancelled; then it ends."""
    q = state.hub.subscribe(job_id)
    try:
        job = state.store.get(job_id)
        yield _sse("status", {"job_id": job_id, "status": job["status"], "position": state.store.position(job_id)})
        if job["status"] in TERMINAL:
            yield _sse(job["status"], {"job_id": job_id, "error": job["error"]})
            return
        while True:
            try:
                ev = await asyncio.wait_for(q.get(), timeout=KEEPALIVE_S)
            except asyncio.TimeoutError:
                job = state.store.get(job_id)
                if job["status"] in TERMINAL:   # finished while no event could reach us
                    yield _sse(job["status"], {"job_id": job_id, "error": job["error"]})
                    return
                yield ": keep-alive\n\n"
                continue
            yield _sse(ev["event"], ev)
            if ev["event"] in TERMINAL_EVENTS:
                return
    finally:
        state.hub.unsubscribe(job_id, q)


def safe_output_path(outputs: Path, rel: str) -> Path:
    """The file `rel` names inside `outputs`, or 404: no '..', absolute paths, backslashes or links out."""
    parts = rel.replace("\\", "/").split("/")
    if "\\" in rel or "\0" in rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) \
            or ":" in parts[0]:
        raise HTTPException(404, "Not Found")
    root = outputs.resolve()
    path = (root / Path(*parts)).resolve()
    if not path.is_relative_to(root) or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        raise HTTPException(404, "Not Found")
    return path


def _job_or_404(state: AppState, job_id: str) -> dict:
    job = state.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def native_router(state: AppState) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["sdstack API"])
    JobRequest = native_job_model()

    @router.post("/jobs", response_model=JobCreated, status_code=202)
    async def submit_job(req: JobRequest):
        """Queue a generation (img2img when init_images are given); returns its id at once."""
        spec = await run_in_threadpool(native_job, req.model_dump(), state)
        job_id = await run_in_threadpool(state.queue.submit, spec)
        return _created(state, job_id)

    @router.get("/jobs", response_model=list[JobInfo])
    def list_jobs(status: str | None = Query(None, pattern="^(queued|running|done|failed|cancelled)$"),
                  limit: int = Query(50, ge=1, le=500)):
        return [job_info(state, j) for j in state.store.list(status, limit)]

    @router.get("/jobs/{job_id}", response_model=JobInfo)
    def get_job(job_id: str):
        return job_info(state, _job_or_404(state, job_id))

    @router.delete("/jobs/{job_id}", response_model=JobInfo)
    def cancel_job(job_id: str):
        """Cancel a queued job, or stop a running one at its next step (its images are discarded)."""
        job = _job_or_404(state, job_id)
        if job["status"] in TERMINAL:
            raise HTTPException(409, f"job {job_id} is already {job['status']}")
        state.queue.cancel(job_id)
        return job_info(state, state.store.get(job_id))

    @router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}}})
    def job_events(job_id: str):
        """Server-Sent Events: status, progress {step, total, preview: data URI}, then done/failed/cancelled."""
        _job_or_404(state, job_id)
        return StreamingResponse(event_stream(state, job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    router.include_router(gallery_router(state))
    return router


def gallery_router(state: AppState) -> APIRouter:
    router = APIRouter(tags=["sdstack API"])

    @router.get("/images", response_model=ImageList)
    def images(q: str | None = Query(None, max_length=1000, description="Words that must all be in the prompt"),
               model: str | None = Query(None, max_length=300), date: str | None = None,
               since: str | None = None, until: str | None = None,
               limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)):
        """The gallery, newest first: search by prompt words, model name or hash, and date (UTC)."""
        return gallery.search(state.db, q=q, model=model, date=date, since=since, until=until, limit=limit,
                              offset=offset)

    @router.get("/images/{image_id}", response_model=ImageRecord)
    def image(image_id: int):
        found = gallery.get_image(state.db, image_id)
        if found is None:
            raise HTTPException(404, f"no image {image_id}")
        return found

    @router.post("/images/{image_id}/resubmit", response_model=JobCreated, status_code=202)
    async def resubmit(image_id: int, changes: dict = Body(default={})):
        """Queue the image's parameters again (same model and init images), with optional changes."""
        return await run_in_threadpool(_resubmit, state, image_id, changes)

    return router


def _resubmit(state: AppState, image_id: int, changes: dict) -> dict:
    found = gallery.get_image(state.db, image_id)
    if found is None:
        raise HTTPException(404, f"no image {image_id}")
    unknown = sorted(set(changes) - set(PARAMS_BY_NAME) - {"model", "vae"})
    if unknown:
        raise UserError(f"unknown field {unknown[0]!r}; allowed: generation parameters, model, vae", field=unknown[0])
    job = state.store.get(found["job_id"])
    body = {**found["params"], "model": job["model"], "vae": job["vae"], **changes}
    pngs = state.store.inputs(job["id"]) if job["kind"] == "img2img" else None
    spec = native_job(body, state, source="resubmit", pngs=pngs)
    return _created(state, state.queue.submit(spec))


def files_router(state: AppState) -> APIRouter:
    router = APIRouter(tags=["files"])

    @router.get("/outputs/{rel:path}", response_class=FileResponse)
    def output_file(rel: str):
        """A generated image under the outputs folder (nothing outside it)."""
        return FileResponse(safe_output_path(state.data.outputs, rel))

    return router
