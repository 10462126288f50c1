"""The web UI (Gradio), mounted at / on the server's FastAPI app: txt2img, img2img, Gallery and PNG Info tabs.

Controls come from sdstack.params.PARAMS (ui_controls); generations are jobs in the durable queue and their
progress comes from the job's events (ui_jobs); gallery and PNG-info logic is in ui_gallery. Gradio is
imported only when the UI is built (`mount_ui`), never when this module is imported.
"""

from __future__ import annotations

from types import SimpleNamespace

from .state import AppState
from .ui_generate import generation_tab
from .ui_views import gallery_tab, pnginfo_tab, wire_send

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
UPLOAD_LIMIT = 64 * 1024 * 1024

CSS = """
.sd-progress { position: relative; min-height: 1.8em; border-radius: 6px; overflow: hidden;
               background: var(--block-background-fill); border: 1px solid var(--border-color-primary); }
.sd-progress-bar { position: absolute; inset: 0 auto 0 0; background: var(--color-accent-soft);
                   transition: width 0.2s; }
.sd-progress span { position: relative; padding: 0 0.6em; line-height: 1.8em; }
.sd-tool { max-width: 3.2em; min-width: 3.2em !important; }
"""


def _theme(gr):
    """Gradio's default look with system fonts: the page loads nothing from outside this server."""
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def _top_row(gr, state: AppState):
    from .ui_gallery import model_choices, vae_choices

    titles, current = model_choices(state)
    with gr.Row():
        model = gr.Dropdown(titles, value=current, label="Stable Diffusion checkpoint", elem_id="model",
                            info="The model this page's generations use.", scale=4)
        vae = gr.Dropdown(vae_choices(state), value="Automatic", label="VAE", elem_id="vae", scale=2)
        refresh = gr.Button("\u21bb", elem_id="refresh_models", elem_classes="sd-tool", scale=0,
                            min_width=48)
    return SimpleNamespace(model=model, vae=vae, refresh=refresh)


def _wire_refresh(gr, blocks, state: AppState, top, tabs: list) -> None:
    from .ui_gallery import model_choices, vae_choices

    def refresh(model):
        state.loras.refresh()
        titles, current = model_choices(state)
        bare = {t.split(" [")[0]: t for t in titles}          # keep the pick when its title gained a hash
        model = model if model in titles else bare.get((model or "").split(" [")[0], current)
        loras = gr.Dropdown(choices=state.loras.names())
        return [gr.Dropdown(choices=titles, value=model), gr.Dropdown(choices=vae_choices(state))] + \
            [loras for _ in tabs]

    outputs = [top.model, top.vae, *[t.lora for t in tabs]]
    top.refresh.click(refresh, inputs=[top.model], outputs=outputs, show_progress="hidden")
    blocks.load(refresh, inputs=[top.model], outputs=outputs, show_progress="hidden")


def build_ui(state: AppState):
    """The gr.Blocks of the whole page (not yet mounted)."""
    import gradio as gr

    # delete_cache: Gradio's copies of uploads and shown images (not the outputs) go after a day
    with gr.Blocks(title="sdstack", analytics_enabled=False, delete_cache=(3600, 86400)) as blocks:
        top = _top_row(gr, state)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                t2i = generation_tab(gr, state, "txt2img", top)
            with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
                i2i = generation_tab(gr, state, "img2img", top)
            with gr.Tab("Gallery", id="gallery", elem_id="tab_gallery") as gallery_tab_item:
                gal = gallery_tab(gr, state, gallery_tab_item)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                png = pnginfo_tab(gr, state)
        views = SimpleNamespace(tabs=tabs, top=top, txt2img=t2i, img2img=i2i, gallery=gal, pnginfo=png)
        wire_send(gr, state, views)
        _wire_refresh(gr, blocks, state, top, [t2i, i2i])
    return blocks


def mount_ui(app, state: AppState):
    """Mount the UI at / on `app` (after every API route, so those keep matching first)."""
    import gradio as gr

    blocks = build_ui(state)
    return gr.mount_gradio_app(app, blocks, path="/", allowed_paths=[str(state.data.outputs)],
                               footer_links=[], theme=_theme(gr), css=CSS, max_file_size=UPLOAD_LIMIT,
                               ssr_mode=False, mcp_server=False, pwa=False, show_error=True)


__all__ = ["build_ui", "mount_ui"]
