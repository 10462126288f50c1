"""The web UI's gallery and PNG-info logic: search, an image's parameters, and turning stored parameters or an
image's infotext into control values ("send to txt2img"). No Gradio in here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from . import gallery
from .state import AppState

PAGE = 60


def search(state: AppState, q: str | None, model: str | None) -> list[dict]:
    """Gallery records, newest first (the same search as GET /api/v1/images)."""
    found = gallery.search(state.db, q=(q or "").strip() or None, model=(model or "").strip() or None, limit=PAGE)
    return found["items"]


def gallery_items(state: AppState, records: list[dict]) -> list[tuple[str, str]]:
    """(file path, caption) pairs for gr.Gallery."""
    out = []
    for r in records:
        path = state.data.outputs / r["path"]
        if path.is_file():
            out.append((str(path), f"#{r['id']} {r['prompt'][:60]}"))
    return out


def details(record: dict | None) -> str:
    if not record:
        return ""
    return f"{record['infotext']}\n\nImage #{record['id']} · job {record['job_id']} · {record['created_at']}"


def model_title(state: AppState, model_path: str | None) -> str | None:
    """The picker title of a listed checkpoint, or None if that checkpoint is not listed any more."""
    if not model_path:
        return None
    for path in state.catalog.checkpoints():
        if str(path) == str(model_path):
            return state.catalog.title(path)
    return None


def record_values(state: AppState, record: dict) -> tuple[dict[str, Any], str | None]:
    """(parameter values, model title) of a gallery image: the exact parameters its job ran with."""
    job = state.store.get(record["job_id"]) or {}
    return dict(record["params"]), model_title(state, job.get("model"))


def read_png_info(path: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(infotext or a message, parameter values, other facts) of an image file."""
    if not path:
        return "", {}, {}
    from PIL import Image

    from ..engine.infotext import params_from_infotext
    from ..metadata.images import read_infotext, read_other_info

    try:
        with Image.open(path) as img:
            img.load()
            text = read_infotext(img)
            other = read_other_info(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"not an image: {e}", {}, {}
    if not text:
        extra = "\n".join(f"{k}: {v}" for k, v in other.items())
        return "This image carries no generation parameters." + (f"\n\n{extra}" if extra else ""), {}, {}
    values, facts = params_from_infotext(text)
    return text, values, facts


def find_model_title(state: AppState, facts: dict) -> str | None:
    """The picker title of the model an infotext names (by hash or name), if it is installed."""
    for key in ("Model hash", "Model"):
        name = facts.get(key)
        if not name:
            continue
        try:
            return state.catalog.title(state.catalog.resolve_model(str(name)))
        except UserError:
            continue
    return None


def values_for(params: list, values: dict[str, Any], current: list[Any]) -> list[Any]:
    """New control values: those in `values`, the current ones for parameters it does not mention."""
    return [values.get(p.name, cur) for p, cur in zip(params, current)]


def model_choices(state: AppState) -> tuple[list[str], str | None]:
    titles = [state.catalog.title(p) for p in state.catalog.checkpoints()]
    try:
        current = state.catalog.title(state.options.model_path())
    except UserError:
        current = titles[0] if titles else None
    return titles, current


def vae_choices(state: AppState) -> list[str]:
    return ["Automatic", *[Path(p).name for p in state.catalog.vaes()]]
