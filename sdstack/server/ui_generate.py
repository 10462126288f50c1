"""A txt2img / img2img tab: controls from PARAMS, Generate / Interrupt / Skip, live progress and results."""

from __future__ import annotations

from types import SimpleNamespace

from starlette.concurrency import run_in_threadpool

from . import ui_controls as uc
from . import ui_jobs
from .state import AppState


def _seed_row(gr, p, tab: str, controls: dict, buttons: dict) -> None:
    with gr.Row(equal_height=True):
        controls[p.name] = uc.make_control(gr, p, tab)
        dice = gr.Button("\u2684", elem_id=f"{tab}_{p.name}_random", elem_classes="sd-tool", scale=0, min_width=48)
        reuse = gr.Button("\u267b", elem_id=f"{tab}_{p.name}_reuse", elem_classes="sd-tool", scale=0, min_width=48)
    buttons[p.name] = (dice, reuse)


def _add_controls(gr, params, tab: str, controls: dict, seed_buttons: dict) -> None:
    for p in params:
        if uc.is_seed(p):
            _seed_row(gr, p, tab, controls, seed_buttons)
        else:
            controls[p.name] = uc.make_control(gr, p, tab)


def _layout(gr, state: AppState, tab: str) -> SimpleNamespace:
    secs = uc.sections(tab)
    controls: dict = {}
    seed_buttons: dict = {}
    v = SimpleNamespace(tab=tab, params=uc.tab_params(tab), controls=controls, seed_buttons=seed_buttons,
                        init=None)
    with gr.Row():
        with gr.Column(scale=5):
            _add_controls(gr, secs["prompt"], tab, controls, seed_buttons)
        with gr.Column(scale=1, min_width=180):
            v.generate = gr.Button("Generate", variant="primary", elem_id=f"{tab}_generate", size="lg")
            with gr.Row():
                v.interrupt = gr.Button("Interrupt", elem_id=f"{tab}_interrupt", size="sm")
                v.skip = gr.Button("Skip", elem_id=f"{tab}_skip", size="sm")
            v.lora = gr.Dropdown(state.loras.names(), value=None, label="Add a LoRA to the prompt",
                                 elem_id=f"{tab}_lora")
    with gr.Row():
        with gr.Column():
            if tab == "img2img":
                v.init = gr.Image(label="Image for img2img", type="pil", image_mode="RGB", sources=["upload"],
                                  elem_id="img2img_init", height=320)
            _add_controls(gr, secs["core"], tab, controls, seed_buttons)
            for name, params in secs.items():
                if name not in ("prompt", "core"):
                    with gr.Accordion(uc.section_title(name), open=name in uc.OPEN_SECTIONS):
                        _add_controls(gr, params, tab, controls, seed_buttons)
        with gr.Column():
            v.progress = gr.HTML(ui_jobs.progress_html(None), elem_id=f"{tab}_progress")
            v.preview = gr.Image(label="Live preview", interactive=False, elem_id=f"{tab}_preview", height=160,
                                 format="png")
            v.results = gr.Gallery(label="Output", elem_id=f"{tab}_results", columns=4, height="auto",
                                   interactive=False, format="png")
            v.info = gr.Textbox(label="Generation parameters", lines=4, interactive=False, elem_id=f"{tab}_info",
                                buttons=["copy"])
    v.session = gr.State({})
    return v


def _generator(gr, state: AppState, v: SimpleNamespace):
    """The Generate handler: submit a job row, then follow its events until it ends."""
    keep = gr.skip

    async def generate(session, model, vae, init, *values):
        body = uc.body_from_values(v.params, list(values))
        body["model"] = model or None
        body["vae"] = None if vae in (None, "", "Automatic") else vae
        if v.tab == "img2img" and init is None:
            yield ui_jobs.progress_html(None, "img2img needs an image: drop one above"), keep(), keep(), keep(), \
                session
            return
        try:
            job_id = await run_in_threadpool(ui_jobs.submit, state, body, init)
        except Exception as e:  # noqa: BLE001 - a bad value is shown on the page, never a traceback
            yield ui_jobs.progress_html(None, "Error: " + ui_jobs.user_error_text(e)), keep(), keep(), keep(), \
                session
            return
        session = dict(session or {}, job_id=job_id)
        shown = None
        async for view in ui_jobs.follow(state, job_id):
            if view.status in ("queued", "running"):   # send a preview only when it is a new one
                new = view.preview is not None and view.preview is not shown
                shown = view.preview
                yield ui_jobs.progress_html(view), view.preview if new else keep(), keep(), keep(), session
                continue
            if view.seeds:
                session = dict(session, seed=view.seeds[0], subseed=(view.subseeds or [None])[0])
            info = "\n\n".join(view.infotexts) or (view.error or "")
            yield ui_jobs.progress_html(view), None, view.images, info, session

    return generate


def _wire(gr, state: AppState, v: SimpleNamespace, top) -> None:
    init = v.init if v.init is not None else gr.State(None)
    inputs = [v.session, top.model, top.vae, init, *[v.controls[p.name] for p in v.params]]
    v.generate.click(_generator(gr, state, v), inputs=inputs,
                     outputs=[v.progress, v.preview, v.results, v.info, v.session],
                     concurrency_limit=None, show_progress="hidden")
    for how, button in (("interrupt", v.interrupt), ("skip", v.skip)):
        button.click(lambda s, how=how: gr.Info(ui_jobs.stop(state, (s or {}).get("job_id"), how)),
                     inputs=[v.session], concurrency_limit=None, show_progress="hidden")
    for name, (dice, reuse) in v.seed_buttons.items():
        dice.click(lambda: -1, outputs=[v.controls[name]], show_progress="hidden")
        reuse.click(lambda s, name=name: _last(gr, s, name), inputs=[v.session], outputs=[v.controls[name]],
                    show_progress="hidden")
    v.lora.input(_add_lora, inputs=[v.lora, v.controls["prompt"]], outputs=[v.controls["prompt"], v.lora],
                 show_progress="hidden")


def _last(gr, session, name: str):
    """The recycle button: the seed (or variation seed) of this session's last finished job."""
    value = (session or {}).get(name)
    return value if value is not None else gr.skip()


def _add_lora(name, prompt):
    if not name:
        return prompt, None
    tag = f"<lora:{name}:1>"
    return (f"{prompt} {tag}".strip() if tag not in (prompt or "") else prompt), None


def generation_tab(gr, state: AppState, tab: str, top) -> SimpleNamespace:
    v = _layout(gr, state, tab)
    _wire(gr, state, v, top)
    return v
