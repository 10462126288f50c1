"""The UI without a browser: controls derived from PARAMS, auth on every UI route, lazy Gradio import,
and the pieces of logic behind the buttons."""

import subprocess
import sys

import pytest
from PIL import Image

from sdstack.params import PARAMS, param_label
from sdstack.server import ui_controls as uc
from sdstack.server import ui_gallery, ui_jobs

from .conftest import AUTH, make_data_dir

# (method, path, status with credentials: proof that the path reaches Gradio; None = not called with them)
GRADIO_ROUTES = [("GET", "/", 200), ("GET", "/config", 200), ("GET", "/gradio_api/info", 200),
                 ("GET", "/theme.css", 200), ("POST", "/gradio_api/queue/join", 422),
                 ("POST", "/gradio_api/upload", 400), ("GET", "/gradio_api/file=/etc/hostname", 403),
                 ("GET", "/gradio_api/queue/data?session_hash=x", None), ("GET", "/gradio_api/heartbeat/x", None),
                 ("GET", "/assets/index.js", None)]


@pytest.fixture(scope="module")
def ui_client(tiny_model_template, tmp_path_factory):
    from fastapi.testclient import TestClient

    from sdstack.server.app import create_app
    from sdstack.server.config import ServerConfig

    data_dir = make_data_dir(tiny_model_template, tmp_path_factory.mktemp("ui-app"))
    app = create_app(ServerConfig(data_dir=data_dir, ui=True, api_auth=(AUTH,)))
    with TestClient(app) as client:
        yield client


def test_gradio_is_imported_only_when_the_ui_is_built():
    code = ("import sys, sdstack.server.app, sdstack.server.ui, sdstack.server.ui_generate, sdstack.server.ui_views; "
            "print('gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_every_parameter_has_a_control_from_the_schema(tab):
    shown = {p.name for p in uc.tab_params(tab)}
    left_out = {p.name for p in PARAMS} - shown
    # txt2img has no init image (its resize mode); img2img has no hires fix
    expected = {"resize_mode"} if tab == "txt2img" else {p.name for p in PARAMS if p.group == "hires"}
    assert left_out == expected
    for p in uc.tab_params(tab):
        kind, kw = uc.control_spec(p, tab)
        assert kw["label"] == param_label(p) and kw["info"] == p.help and kw["value"] == p.default
        if p.choices:
            assert kind == "dropdown" and kw["choices"] == p.choices()
        elif kind in ("slider", "number") and p.min is not None:
            assert (kw["minimum"], kw["maximum"]) == (p.min, p.max)
    assert uc.control_spec(PARAMS[[p.name for p in PARAMS].index("seed")], tab)[0] == "number"


def test_page_config_carries_the_schema(ui_client):
    """The built page (Gradio's /config) has one control per parameter with the schema's limits and choices."""
    config = ui_client.get("/config", auth=AUTH).json()
    by_id = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c.get("props")}
    for p in uc.tab_params("txt2img"):
        props = by_id[f"txt2img_{p.name}"]
        assert props["label"] == param_label(p)
        if p.choices:
            assert [c[0] for c in props["choices"]] == p.choices()
        if p.max is not None and "maximum" in props:
            assert (props["minimum"], props["maximum"]) == (p.min, p.max)
    for elem_id in ("txt2img_generate", "txt2img_interrupt", "txt2img_skip", "txt2img_seed_random",
                    "txt2img_seed_reuse", "txt2img_lora", "model", "gallery", "gallery_search", "pnginfo_image",
                    "img2img_init", "img2img_generate"):
        assert elem_id in by_id, elem_id


@pytest.mark.parametrize("method,path,with_auth", GRADIO_ROUTES)
def test_every_ui_route_needs_credentials(ui_client, method, path, with_auth):
    for auth in (None, ("alice", "wrong"), ("mallory", AUTH[1])):
        r = ui_client.request(method, path, auth=auth)
        assert r.status_code == 401, (path, auth, r.status_code)
        assert r.headers["www-authenticate"].startswith("Basic")
    if with_auth is not None:
        assert ui_client.request(method, path, auth=AUTH).status_code == with_auth


def test_with_credentials_the_page_loads(ui_client):
    r = ui_client.get("/", auth=AUTH)
    assert r.status_code == 200 and "gradio" in r.text.lower()
    assert ui_client.get("/sdapi/v1/samplers", auth=AUTH).status_code == 200   # API routes still match first
    assert ui_client.get("/api/v1/jobs", auth=AUTH).json() == []


def test_ui_is_off_unless_asked(tools_free_app):
    assert tools_free_app.get("/").status_code == 404


@pytest.fixture
def tools_free_app(tiny_model_template, tmp_path):
    from fastapi.testclient import TestClient

    from sdstack.server.app import create_app
    from sdstack.server.config import ServerConfig

    with TestClient(create_app(ServerConfig(data_dir=make_data_dir(tiny_model_template, tmp_path)))) as client:
        yield client


def test_control_values_become_a_job_body():
    params = uc.tab_params("txt2img")
    values = [{"steps": 4.0, "cfg_scale": 6.5, "seed": 12.0}.get(p.name, p.default) for p in params]
    body = uc.body_from_values(params, values)
    assert body["steps"] == 4 and isinstance(body["steps"], int) and body["cfg_scale"] == 6.5
    assert body["seed"] == 12 and set(body) == {p.name for p in params}


def test_progress_html_states():
    view = ui_jobs.JobView("j1", "running", step=3, total=4)
    assert 'data-status="running"' in ui_jobs.progress_html(view) and "Step 3/4" in ui_jobs.progress_html(view)
    assert "width:75%" in ui_jobs.progress_html(view)
    assert "position 2" in ui_jobs.progress_html(ui_jobs.JobView("j1", "queued", position=1))
    failed = ui_jobs.progress_html(ui_jobs.JobView("j1", "failed", error="<b>bad</b>"))
    assert "&lt;b&gt;bad" in failed   # escaped


def test_png_info_of_plain_and_generated_images(tmp_path):
    from sdstack.metadata.images import save_image_atomic

    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    text, values, _ = ui_gallery.read_png_info(str(plain))
    assert "no generation parameters" in text and values == {}
    made = tmp_path / "made.png"
    save_image_atomic(Image.new("RGB", (8, 8)), made,
                      "a cat\nNegative prompt: dog\nSteps: 7, Sampler: Euler a, CFG scale: 5, Seed: 42, Size: 8x8")
    text, values, _ = ui_gallery.read_png_info(str(made))
    assert values["prompt"] == "a cat" and values["negative_prompt"] == "dog"
    assert (values["steps"], values["sampler_name"], values["seed"], values["width"]) == (7, "Euler a", 42, 8)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert ui_gallery.read_png_info(str(broken))[0].startswith("not an image")


def test_send_keeps_values_the_source_does_not_name():
    params = uc.tab_params("txt2img")
    current = [p.default for p in params]
    new = ui_gallery.values_for(params, {"steps": 9}, current)
    assert new[[p.name for p in params].index("steps")] == 9
    assert new[[p.name for p in params].index("cfg_scale")] == 7.0


class _FakeQueue:
    def __init__(self, running: str | None):
        self.running, self.calls = running, []

    def current(self):
        return {"job_id": self.running} if self.running else None

    def interrupt(self):
        self.calls.append("interrupt")
        return True

    def skip(self):
        self.calls.append("skip")
        return True

    def cancel(self, job_id):
        self.calls.append(("cancel", job_id))


def _fake_state(running, queued=()):
    import types

    store = types.SimpleNamespace(get=lambda job_id: {"status": "queued" if job_id in queued else "done"})
    return types.SimpleNamespace(queue=_FakeQueue(running), store=store)


def test_interrupt_and_skip_touch_only_this_sessions_job():
    state = _fake_state(running="mine")
    assert ui_jobs.stop(state, "mine", "interrupt") == "interrupt requested"
    assert ui_jobs.stop(state, "mine", "skip") == "skip requested"
    assert state.queue.calls == ["interrupt", "skip"]
    other = _fake_state(running="someone-else", queued=("mine",))
    assert ui_jobs.stop(other, "mine", "interrupt") == "cancelled while queued"
    assert ui_jobs.stop(other, "mine", "skip") == "the job is not running"
    assert ui_jobs.stop(other, None, "interrupt") == "nothing to stop"
    assert other.queue.calls == [("cancel", "mine")]


def test_lora_picker_appends_a_tag_once():
    from sdstack.server.ui_generate import _add_lora

    assert _add_lora("styleA", "a cat") == ("a cat <lora:styleA:1>", None)
    assert _add_lora("styleA", "a cat <lora:styleA:1>") == ("a cat <lora:styleA:1>", None)
    assert _add_lora(None, "a cat") == ("a cat", None)


def test_a_bad_value_is_shown_on_the_page_and_queues_nothing(ui_client):
    import asyncio
    import types

    import gradio as gr

    from sdstack.server.ui_generate import _generator

    state = ui_client.app.state.sdstack
    view = types.SimpleNamespace(tab="txt2img", params=uc.tab_params("txt2img"))
    values = [{"width": 65, "height": 64, "prompt": "x"}.get(p.name, p.default) for p in view.params]

    async def run():
        return [out async for out in _generator(gr, state, view)({}, None, "Automatic", None, *values)]

    before = len(state.store.list())
    (html, *_), = asyncio.run(run())
    assert "Error: width must be a multiple of 8" in html and 'data-status="idle"' in html
    assert len(state.store.list()) == before
