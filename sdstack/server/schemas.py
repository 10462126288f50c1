"""Request and response models. Generation fields are derived from sdstack.params.PARAMS (never listed
here); A1111-only request fields come from a1111_fields.API_FIELDS."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..params import PARAMS, Param
from .a1111_fields import PARAM_API_DEFAULTS, PARAMS_NOT_IN, fields_for


def _describe(p: Param) -> str:
    text = p.help
    if p.min is not None and p.max is not None:
        text += f" Range {p.min:g}..{p.max:g}."
    if p.multiple_of:
        text += f" Multiple of {p.multiple_of}."
    if p.choices:
        text += " One of: " + ", ".join(repr(c) for c in p.choices()) + "."
    return text


def _schema_extra(p: Param) -> dict:
    extra: dict[str, Any] = {}
    if p.min is not None:
        extra["minimum"] = p.min
    if p.max is not None:
        extra["maximum"] = p.max
    if p.multiple_of:
        extra["multipleOf"] = p.multiple_of
    if p.choices:
        extra["examples"] = [p.choices()[0]]
    return extra


def param_field(p: Param, *, api: bool) -> tuple:
    """(annotation, FieldInfo) of one PARAMS entry; `api` uses A1111's API default where it differs."""
    default = p.api_default if api and p.api_default is not None else p.default
    if api and p.name in PARAM_API_DEFAULTS:
        default = PARAM_API_DEFAULTS[p.name]
    return (p.type | None, Field(default=default, description=_describe(p), json_schema_extra=_schema_extra(p)))


def a1111_request_model(kind: str) -> type[BaseModel]:
    """StableDiffusion{Txt2Img,Img2Img}ProcessingAPI: PARAMS fields + A1111-only fields; unknown keys ignored."""
    fields: dict[str, tuple] = {p.name: param_field(p, api=True) for p in PARAMS if p.name not in PARAMS_NOT_IN[kind]}
    for f in fields_for(kind):
        help_text = f.help + (f" Accepted values: {f.allowed}." if f.allowed else "")
        fields[f.name] = (f.type | None, Field(default=f.default, description=help_text))
    name = "StableDiffusionTxt2ImgProcessingAPI" if kind == "txt2img" else "StableDiffusionImg2ImgProcessingAPI"
    return create_model(name, __config__=ConfigDict(extra="ignore"), **fields)


def native_job_model() -> type[BaseModel]:
    """POST /api/v1/jobs: PARAMS fields with sdstack's defaults, plus model, vae and init images."""
    fields: dict[str, tuple] = {p.name: param_field(p, api=False) for p in PARAMS}
    fields["model"] = (str | None, Field(default=None, description="Checkpoint title, name or short hash "
                                                                   "(GET /sdapi/v1/sd-models); null = current."))
    fields["vae"] = (str | None, Field(default=None, description="VAE name (GET /sdapi/v1/sd-vae); null = the "
                                                                 "model's own."))
    fields["init_images"] = (list[str] | None, Field(default=None, description="Base64 images: img2img when given."))
    return create_model("JobRequest", __config__=ConfigDict(extra="forbid"), **fields)


# ---------------------------------------------------------------------------------------------- responses

class GenerationResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs carrying the infotext (PNG 'parameters' chunk).")
    parameters: dict = Field(description="The request, echoed with defaults filled in.")
    info: str = Field(description="JSON string: seeds, prompts, sizes, infotexts, model name and hash.")


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class PNGInfoRequest(BaseModel):
    image: str = Field(description="Base64 image (optional data: prefix).")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class SDVaeItem(BaseModel):
    model_name: str
    filename: str


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict


class EmbeddingsResponse(BaseModel):
    loaded: dict
    skipped: dict


class MemoryResponse(BaseModel):
    ram: dict
    cuda: dict


class JobCreated(BaseModel):
    id: str
    status: str
    position: int | None
    url: str
    events: str


class ImageRecord(BaseModel):
    id: int
    job_id: str
    url: str
    path: str
    seed: int
    subseed: int | None
    prompt: str
    negative_prompt: str
    params: dict = Field(description="Re-submittable as POST /api/v1/jobs (plus 'model').")
    infotext: str
    model_name: str | None
    model_hash: str | None
    vae_name: str | None
    file_sha256: str | None
    width: int | None
    height: int | None
    created_at: str


class JobInfo(BaseModel):
    id: str
    kind: str
    source: str
    status: str
    position: int | None
    params: dict
    model: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    attempts: int
    error: str | None
    note: str | None
    progress: dict | None = None
    result: dict | None = None
    images: list[ImageRecord] = []


class ImageList(BaseModel):
    total: int
    items: list[ImageRecord]


class ErrorResponse(BaseModel):
    error: str
    detail: str
    field: str | None = None
    errors: list[dict] = []
