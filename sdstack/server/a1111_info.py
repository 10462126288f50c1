"""A1111-compatible information routes under /sdapi/v1: options, models, samplers, LoRAs, PNG info, memory."""

from __future__ import annotations

import os

from fastapi import APIRouter, Body

from .schemas import (EmbeddingsResponse, LoraItem, MemoryResponse, PNGInfoRequest, PNGInfoResponse, SamplerItem,
                      SchedulerItem, SDModelItem, SDVaeItem)
from .state import AppState
from .submit import open_b64_image

_SCHEDULER_RHO = {"karras": 7.0, "polyexponential": 1.0}


def samplers_body() -> list[dict]:
    from ..sampling.registry import SAMPLERS

    out = []
    for s in SAMPLERS.values():
        options: dict = {}
        if s.default_scheduler:
            options["scheduler"] = s.default_scheduler
        for flag, key in (("discard_next_to_last_sigma", "discard_next_to_last_sigma"),
                          ("second_order", "second_order"), ("brownian", "brownian_noise"), ("uses_ensd", "uses_ensd")):
            if getattr(s, flag):
                options[key] = True
        out.append({"name": s.name, "aliases": list(s.aliases), "options": options})
    return out


def schedulers_body() -> list[dict]:
    from ..sampling.schedules import SCHEDULERS

    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None,
             "default_rho": _SCHEDULER_RHO.get(s.name, -1.0), "need_inner_model": s.needs_schedule}
            for s in SCHEDULERS.values()]


def memory_body() -> dict:
    import psutil
    import torch

    proc = psutil.Process(os.getpid())
    rss = proc.memory_info().rss
    total = psutil.virtual_memory().total
    ram = {"free": total - rss, "used": rss, "total": total}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "unavailable"}}
    free, gpu_total = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()
    return {"ram": ram, "cuda": {
        "system": {"free": free, "used": gpu_total - free, "total": gpu_total},
        "active": {"current": s.get("active_bytes.all.current", 0), "peak": s.get("active_bytes.all.peak", 0)},
        "allocated": {"current": s.get("allocated_bytes.all.current", 0),
                      "peak": s.get("allocated_bytes.all.peak", 0)},
        "reserved": {"current": s.get("reserved_bytes.all.current", 0), "peak": s.get("reserved_bytes.all.peak", 0)},
        "inactive": {"current": s.get("inactive_split_bytes.all.current", 0),
                     "peak": s.get("inactive_split_bytes.all.peak", 0)},
        "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}}}


def png_info_body(image_b64: str, max_pixels: int) -> dict:
    from ..metadata.images import read_infotext, read_other_info
    from ..metadata.infotext import parse_infotext

    if not image_b64 or not image_b64.strip():
        return {"info": "", "items": {}, "parameters": {}}
    img = open_b64_image(image_b64, "image", max_pixels)
    info = read_infotext(img) or ""
    return {"info": info, "items": read_other_info(img), "parameters": parse_infotext(info) if info else {}}


def embeddings_body(state: AppState) -> dict:
    if state.runner.embeddings_info is not None:
        return state.runner.embeddings_info
    if not state.data.embeddings.is_dir():
        return {"loaded": {}, "skipped": {}}
    from ..models.embeddings import EmbeddingLibrary
    from ..models.tokenizer import ClipTokenizer

    return EmbeddingLibrary(state.data.embeddings, ClipTokenizer()).api_info()


def info_router(state: AppState) -> APIRouter:
    """Settings and model routes; the list routes are in `lists_router`."""
    router = APIRouter()
    router.include_router(_settings_router(state))
    router.include_router(lists_router(state))
    return router


def _settings_router(state: AppState) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["A1111-compatible API"])

    @router.get("/options")
    def get_options() -> dict:
        """Settings: sd_model_checkpoint (current model title), sd_vae, CLIP_stop_at_last_layers, ..."""
        return state.options.get_all()

    @router.post("/options")
    def set_options(values: dict = Body(...)) -> None:
        """Change settings; sd_model_checkpoint switches the model for the jobs submitted afterwards."""
        state.options.set_many(values)
        return None

    @router.get("/sd-models", response_model=list[SDModelItem])
    def sd_models():
        return state.catalog.sd_models()

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        """Checkpoints are listed from the folder on every request; nothing to refresh."""
        return None

    @router.get("/sd-vae", response_model=list[SDVaeItem])
    def sd_vae():
        return [{"model_name": p.name, "filename": str(p)} for p in state.catalog.vaes()]

    @router.post("/refresh-vae")
    def refresh_vae() -> None:
        return None

    return router


def lists_router(state: AppState) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["A1111-compatible API"])

    @router.get("/samplers", response_model=list[SamplerItem])
    def samplers():
        return samplers_body()

    @router.get("/schedulers", response_model=list[SchedulerItem])
    def schedulers():
        return schedulers_body()

    @router.get("/loras", response_model=list[LoraItem])
    def loras():
        return state.loras.api_list()

    @router.post("/refresh-loras")
    def refresh_loras() -> None:
        state.loras.refresh()
        return None

    @router.get("/embeddings", response_model=EmbeddingsResponse)
    def embeddings():
        """Embeddings of the current model (a plain folder scan before any model is loaded)."""
        return embeddings_body(state)

    @router.post("/png-info", response_model=PNGInfoResponse)
    def png_info(req: PNGInfoRequest):
        """The infotext stored in an image, raw and parsed (values as strings, like A1111)."""
        return png_info_body(req.image, state.config.max_pixels)

    @router.get("/memory", response_model=MemoryResponse)
    def memory():
        return memory_body()

    @router.get("/scripts")
    def scripts() -> dict:
        """No selectable or always-on scripts are installed."""
        return {"txt2img": [], "img2img": []}

    @router.get("/upscalers")
    def upscalers() -> list[dict]:
        """No pixel upscalers are installed; hires fix uses the latent modes (GET /latent-upscale-modes)."""
        return []

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict]:
        from ..params import LATENT_UPSCALE_MODES

        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    return router
