"""AUTOMATIC1111-compatible generation routes under /sdapi/v1: txt2img, img2img, progress, interrupt, skip.

A generation request becomes a job row first (the same queue as the native API), then the handler waits for
it and answers in A1111's shape: {images: [base64 PNG with infotext], parameters: echoed request, info: JSON}.
"""

# (no `from __future__ import annotations`: FastAPI must see the locally built request models)

import base64
import json

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import UserError
from .a1111_request import a1111_job
from .schemas import GenerationResponse, ProgressResponse, a1111_request_model
from .state import AppState


def info_dict(job: dict, images: list[dict]) -> dict:
    """A1111's `Processed.js()` keys, from the job's parameters and result."""
    p, r = job["params"], job["result"] or {}
    seeds, subseeds = r.get("seeds") or [p["seed"]], r.get("subseeds") or [p["subseed"]]
    n = len(r.get("infotexts") or [])
    hires_or_img2img = job["kind"] == "img2img" or p.get("enable_hr")
    return {
        "prompt": p["prompt"], "all_prompts": [p["prompt"]] * n,
        "negative_prompt": p["negative_prompt"], "all_negative_prompts": [p["negative_prompt"]] * n,
        "seed": seeds[0], "all_seeds": seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
        "subseed_strength": p["subseed_strength"], "width": r.get("width") or p["width"],
        "height": r.get("height") or p["height"], "sampler_name": p["sampler_name"], "cfg_scale": p["cfg_scale"],
        "steps": p["steps"], "batch_size": p["batch_size"], "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": r.get("model_name"), "sd_model_hash": r.get("model_hash"),
        "sd_vae_name": r.get("vae_name"), "sd_vae_hash": r.get("vae_hash"),
        "seed_resize_from_w": p["seed_resize_from_w"], "seed_resize_from_h": p["seed_resize_from_h"],
        "denoising_strength": p["denoising_strength"] if hires_or_img2img else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": r.get("infotexts") or [],
        "styles": [], "job_timestamp": r.get("job_timestamp"), "clip_skip": p["clip_skip"],
        "is_using_inpainting_conditioning": False, "version": f"sdstack {__version__}",
        "sdstack_job_id": job["id"], "sdstack_status": job["status"],
        "sdstack_interrupted": bool(r.get("interrupted")), "sdstack_image_ids": [im["id"] for im in images],
    }


def _read_images(state: AppState, images: list[dict]) -> list[str]:
    return [base64.b64encode((state.data.outputs / im["path"]).read_bytes()).decode() for im in images]


async def run_generation(state: AppState, req, kind: str) -> dict:
    spec = await run_in_threadpool(a1111_job, req, kind, state)
    job_id = await run_in_threadpool(state.queue.submit, spec)
    job = await state.wait_job(job_id)
    if job["status"] == "failed":
        r = job["result"] or {}
        raise UserError(job["error"] or "generation failed", field=r.get("field"), status=r.get("status") or 500)
    images = state.store.images(job_id)
    send = req.send_images is not False
    b64 = await run_in_threadpool(_read_images, state, images) if send else []
    return {"images": b64, "parameters": job["request"], "info": json.dumps(info_dict(job, images))}


def progress_body(state: AppState, skip_current_image: bool) -> dict:
    cur = state.queue.current()
    queued = state.store.count("queued")
    text = f"In queue: {queued}" if queued else None
    if cur is None:
        idle = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None, "textinfo": text}
    n_iter = max(1, cur["n_iter"])
    total = max(1, cur["total"])
    per = max(1, total // n_iter)
    p = 0.01 + cur["step"] / total
    elapsed = cur["elapsed"]
    image = None
    if cur["preview_png"] and not skip_current_image:
        image = base64.b64encode(cur["preview_png"]).decode()
    st = {"skipped": cur["skipped"], "interrupted": cur["interrupted"] or cur["cancelled"],
          "stopping_generation": False, "job": cur["kind"], "job_count": n_iter, "job_timestamp": cur["timestamp"],
          "job_no": cur["iteration"], "sampling_step": cur["step"] - cur["iteration"] * per, "sampling_steps": per}
    return {"progress": min(p, 1.0), "eta_relative": max(0.0, elapsed / p - elapsed), "state": st,
            "current_image": image, "textinfo": text}


async def note_ignored(request: Request, response: Response, model) -> None:
    """Fields A1111 does not know either are ignored (as its pydantic models do); name them in a header."""
    try:
        raw = await request.json()
    except ValueError:
        return
    unknown = sorted(set(raw) - set(model.model_fields)) if isinstance(raw, dict) else []
    if unknown:
        response.headers["X-Sdstack-Ignored-Fields"] = ",".join(unknown)[:2000]


def a1111_router(state: AppState) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["A1111-compatible API"])
    Txt2Img, Img2Img = a1111_request_model("txt2img"), a1111_request_model("img2img")

    @router.post("/txt2img", response_model=GenerationResponse)
    async def txt2img(req: Txt2Img, request: Request, response: Response):
        """Text to image (A1111 v1.10 fields and defaults: steps 50, 512x512, sampler from sampler_index)."""
        await note_ignored(request, response, Txt2Img)
        return await run_generation(state, req, "txt2img")

    @router.post("/img2img", response_model=GenerationResponse)
    async def img2img(req: Img2Img, request: Request, response: Response):
        """Image to image; init_images are base64 images (404 'Init image not found' when missing, as A1111)."""
        await note_ignored(request, response, Img2Img)
        return await run_generation(state, req, "img2img")

    @router.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = Query(False)):
        """Progress of the running job (0 and job_count 0 when idle); current_image is a live preview."""
        return progress_body(state, skip_current_image)

    @router.post("/interrupt")
    def interrupt():
        """Stop the running job after its current step; the images so far are returned and saved."""
        state.queue.interrupt()
        return {}

    @router.post("/skip")
    def skip():
        """Skip the current batch of the running job."""
        state.queue.skip()
        return None

    return router
