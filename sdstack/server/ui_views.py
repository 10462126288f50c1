"""The Gallery and PNG Info tabs, and the "send to txt2img / img2img" buttons that fill a generation tab."""

from __future__ import annotations

from types import SimpleNamespace

from starlette.concurrency import run_in_threadpool

from . import ui_gallery as ug
from .state import AppState


def gallery_tab(gr, state: AppState, tab_item) -> SimpleNamespace:
    g = SimpleNamespace()
    with gr.Row(equal_height=True):
        g.q = gr.Textbox(label="Search prompts", placeholder="words that must all be in the prompt",
                         elem_id="gallery_search", scale=4)
        g.model = gr.Textbox(label="Model", placeholder="name or hash", elem_id="gallery_model", scale=2)
        g.search = gr.Button("Search", elem_id="gallery_search_button", scale=1)
    g.gallery = gr.Gallery(label="Gallery", elem_id="gallery", columns=6, height="auto", interactive=False,
                           format="png", fit_columns=False, object_fit="contain")
    g.records = gr.State([])
    g.selected = gr.State(None)
    g.info = gr.Textbox(label="Parameters", lines=4, interactive=False, elem_id="gallery_info")
    with gr.Row():
        g.to_txt2img = gr.Button("Send to txt2img", elem_id="gallery_to_txt2img")
        g.to_img2img = gr.Button("Send to img2img", elem_id="gallery_to_img2img")

    async def search(q, model):
        records = await run_in_threadpool(ug.search, state, q, model)
        return ug.gallery_items(state, records), records, None, ""

    async def refresh(q, model):   # opening the tab shows new images and keeps the selected one
        return (await search(q, model))[:2]

    outputs = [g.gallery, g.records, g.selected, g.info]
    g.search.click(search, inputs=[g.q, g.model], outputs=outputs)
    g.q.submit(search, inputs=[g.q, g.model], outputs=outputs)
    tab_item.select(refresh, inputs=[g.q, g.model], outputs=outputs[:2])

    def select(records, evt):
        record = records[evt.index] if records and 0 <= evt.index < len(records) else None
        return record, ug.details(record)

    select.__annotations__ = {"records": list, "evt": gr.SelectData}   # how Gradio knows to pass the event

    g.gallery.select(select, inputs=[g.records], outputs=[g.selected, g.info], show_progress="hidden")
    return g


def pnginfo_tab(gr, state: AppState) -> SimpleNamespace:
    p = SimpleNamespace()
    with gr.Row():
        with gr.Column():
            p.image = gr.Image(label="Drop an image", type="filepath", image_mode=None, sources=["upload"],
                               elem_id="pnginfo_image", height=360)
        with gr.Column():
            p.text = gr.Textbox(label="Parameters", lines=8, interactive=False, elem_id="pnginfo_text")
            with gr.Row():
                p.to_txt2img = gr.Button("Send to txt2img", elem_id="pnginfo_to_txt2img")
                p.to_img2img = gr.Button("Send to img2img", elem_id="pnginfo_to_img2img")
    p.parsed = gr.State({})

    async def read(path):
        text, values, facts = await run_in_threadpool(ug.read_png_info, path)
        return text, {"values": values, "facts": facts, "path": path}

    p.image.change(read, inputs=[p.image], outputs=[p.text, p.parsed], show_progress="hidden")
    return p


def _sender(gr, state: AppState, target, tabs, source: str):
    """A handler that fills `target`'s controls (and the model picker, and img2img's image) and switches tab."""
    with_image = target.init is not None

    def send(picked, model, *current):
        if not picked or (source == "pnginfo" and not picked.get("values")):
            return [gr.skip()] * (len(current) + 2 + with_image)
        if source == "gallery":
            values, title = ug.record_values(state, picked)
            path = str(state.data.outputs / picked["path"])
        else:
            values, title = picked["values"], ug.find_model_title(state, picked["facts"])
            path = picked.get("path")
        titles, _ = ug.model_choices(state)   # titles gain the short hash once a model has been loaded
        out = [*ug.values_for(target.params, values, list(current)), gr.Dropdown(choices=titles, value=title or model),
               gr.Tabs(selected=target.tab)]
        return out + ([path] if with_image else [])

    return send


def wire_send(gr, state: AppState, views) -> None:
    """The four send buttons: gallery / PNG info -> txt2img / img2img."""
    sources = (("gallery", views.gallery.selected, views.gallery), ("pnginfo", views.pnginfo.parsed, views.pnginfo))
    for source, picked, view in sources:
        for target in (views.txt2img, views.img2img):
            button = view.to_txt2img if target.tab == "txt2img" else view.to_img2img
            controls = [target.controls[p.name] for p in target.params]
            outputs = [*controls, views.top.model, views.tabs] + ([target.init] if target.init is not None else [])
            button.click(_sender(gr, state, target, views.tabs, source), inputs=[picked, views.top.model, *controls],
                         outputs=outputs, show_progress="hidden")
