"""Web UI controls derived from the one parameter schema (sdstack.params.PARAMS); nothing here lists parameters.

`control_spec` turns a Param into a plain description (kind + keyword arguments), so the mapping is testable
without Gradio; `make_control` builds the Gradio component from it. `sections` decides where each parameter
goes in a tab from its `group`.
"""

from __future__ import annotations

from typing import Any

from ..params import PARAMS, Param, param_label

PROMPT_NAMES = ("prompt", "negative_prompt")
NUMBER_BOX_RANGE = 100_000        # wider int ranges (seeds) get a number box instead of a slider
SECTION_TITLES = {"seed": "Seed extras (variation seed, resize seed from)", "hires": "Hires fix",
                  "img2img": "img2img"}
OPEN_SECTIONS = ("core", "img2img")


def is_seed(p: Param) -> bool:
    """Parameters that get the dice (random) and recycle (last used) buttons."""
    return p.type is int and p.name.endswith("seed")


def _float_step(p: Param) -> float:
    span = (p.max or 1.0) - (p.min or 0.0)
    return 0.01 if span <= 1 else 0.05 if span <= 10 else 0.5


def control_spec(p: Param, tab: str) -> tuple[str, dict[str, Any]]:
    """(component kind, keyword arguments) for one parameter in one tab ("txt2img" / "img2img")."""
    kw: dict[str, Any] = {"label": param_label(p), "info": p.help, "elem_id": f"{tab}_{p.name}"}
    if p.choices is not None:
        return "dropdown", dict(kw, choices=list(p.choices()), value=p.default)
    if p.type is bool:
        return "checkbox", dict(kw, value=p.default)
    if p.type is str:
        lines = 3 if p.name in PROMPT_NAMES else 1
        return "textbox", dict(kw, value=p.default, lines=lines, placeholder=p.help)
    ranged = p.min is not None and p.max is not None
    if p.type is int and (not ranged or p.max - p.min > NUMBER_BOX_RANGE):
        return "number", dict(kw, value=p.default, precision=0, minimum=p.min, maximum=p.max)
    if p.type is int:
        return "slider", dict(kw, value=p.default, minimum=p.min, maximum=p.max, step=p.multiple_of or 1)
    if ranged:
        return "slider", dict(kw, value=p.default, minimum=p.min, maximum=p.max, step=_float_step(p))
    return "number", dict(kw, value=p.default)


def make_control(gr, p: Param, tab: str):
    kind, kw = control_spec(p, tab)
    factory = {"dropdown": gr.Dropdown, "checkbox": gr.Checkbox, "textbox": gr.Textbox, "number": gr.Number,
               "slider": gr.Slider}[kind]
    return factory(**kw)


def section_of(p: Param, tab: str) -> str | None:
    """Where `p` goes in `tab`: "prompt", "core", or its group's accordion; None = not in this tab.

    txt2img has no init image, so the img2img group is left out, except the denoising strength, which the
    hires fix's second pass uses too; img2img has no hires fix."""
    if p.name in PROMPT_NAMES:
        return "prompt"
    if tab == "txt2img" and p.group == "img2img":
        return "hires" if p.name == "denoising_strength" else None
    if tab == "img2img" and p.group == "hires":
        return None
    return p.group


def sections(tab: str) -> dict[str, list[Param]]:
    """Section name -> its parameters, in PARAMS order (prompt first, then core, then the groups)."""
    out: dict[str, list[Param]] = {"prompt": [], "core": []}
    for p in PARAMS:
        where = section_of(p, tab)
        if where is not None:
            out.setdefault(where, []).append(p)
    return out


def tab_params(tab: str) -> list[Param]:
    """Every parameter shown in `tab`, in the order the controls are created (= the handler's inputs)."""
    return [p for params in sections(tab).values() for p in params]


def section_title(name: str) -> str:
    return SECTION_TITLES.get(name, name.replace("_", " ").capitalize())


def body_from_values(params: list[Param], values: list[Any]) -> dict[str, Any]:
    """Control values -> a job body keyed by parameter name (whole numbers from sliders/boxes made ints)."""
    body: dict[str, Any] = {}
    for p, v in zip(params, values):
        if v is None:
            continue
        if p.type is int and isinstance(v, float) and v == int(v):
            v = int(v)
        body[p.name] = v
    return body
