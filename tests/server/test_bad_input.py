"""Bad input gets a 4xx JSON error naming the field (never a 500), and the server keeps serving."""

import base64
import json

import pytest

MAX_PIXELS = 256 * 256


@pytest.fixture(scope="module")
def client(tools, tmp_path_factory):
    data = tools.data_dir(tmp_path_factory.mktemp("bad"))
    with tools.client(data, model="tiny", max_pixels=MAX_PIXELS) as c:
        yield c


OK = {"prompt": "x", "width": 64, "height": 64, "steps": 1}
NOT_AN_IMAGE = base64.b64encode(b"hello, I am not a PNG").decode()

# (route, body or raw bytes, expected status, expected field, a word the message must contain)
BAD = [
    ("/sdapi/v1/txt2img", b"{not json", 422, "body", "malformed JSON"),
    ("/sdapi/v1/txt2img", b"[1, 2]", 422, "body", "object"),
    ("/sdapi/v1/txt2img", dict(OK, steps="abc"), 422, "steps", "integer"),
    ("/sdapi/v1/txt2img", dict(OK, steps=0), 422, "steps", "between 1 and 1000"),
    ("/sdapi/v1/txt2img", dict(OK, steps=5000), 422, "steps", "between 1 and 1000"),
    ("/sdapi/v1/txt2img", dict(OK, n_iter=1.5), 422, "n_iter", "integer"),
    ("/sdapi/v1/txt2img", dict(OK, batch_size=0), 422, "batch_size", "between"),
    ("/sdapi/v1/txt2img", dict(OK, cfg_scale=1000), 422, "cfg_scale", "between 0 and 100"),
    ("/sdapi/v1/txt2img", dict(OK, cfg_scale=[7]), 422, "cfg_scale", "number"),
    ("/sdapi/v1/txt2img", dict(OK, seed="lucky"), 422, "seed", "integer"),
    ("/sdapi/v1/txt2img", dict(OK, width=63), 422, "width", "multiple of 8"),
    ("/sdapi/v1/txt2img", dict(OK, width=1024, height=1024), 422, "width", "--max-pixels"),
    ("/sdapi/v1/txt2img", dict(OK, enable_hr=True, hr_scale=8), 422, "hr_scale", "--max-pixels"),
    ("/sdapi/v1/txt2img", dict(OK, enable_hr=True, hr_upscaler="ESRGAN_4x"), 422, "hr_upscaler", "Latent"),
    ("/sdapi/v1/txt2img", dict(OK, sampler_name="Nope"), 400, "sampler_name", "Euler a"),
    ("/sdapi/v1/txt2img", dict(OK, scheduler="Nope"), 422, "scheduler", "Karras"),
    ("/sdapi/v1/txt2img", dict(OK, prompt="<lora:missing:0.8>"), 422, "prompt", "missing"),
    ("/sdapi/v1/txt2img", dict(OK, prompt="<lora:x:heavy>"), 422, "prompt", "number"),
    ("/sdapi/v1/txt2img", dict(OK, override_settings={"sd_model_checkpoint": "nope"}), 422,
     "override_settings.sd_model_checkpoint", "tiny"),
    ("/sdapi/v1/txt2img", dict(OK, override_settings={"randn_source": "NV"}), 422,
     "override_settings.randn_source", "CPU"),
    ("/sdapi/v1/txt2img", dict(OK, override_settings={"no_such_setting": 1}), 422,
     "override_settings.no_such_setting", "supported"),
    ("/sdapi/v1/txt2img", dict(OK, restore_faces=True), 422, "restore_faces", "not supported"),
    ("/sdapi/v1/txt2img", dict(OK, sampler_name="Euler a", eta=0.5), 422, "eta", "1.0"),
    ("/sdapi/v1/txt2img", dict(OK, alwayson_scripts={"ControlNet": {"args": []}}), 422, "alwayson_scripts", "{}"),
    ("/sdapi/v1/txt2img", dict(OK, script_name="x/y/z plot"), 422, "script_name", "scripts"),
    ("/sdapi/v1/txt2img", dict(OK, styles=["cinematic"]), 422, "styles", "styles"),
    ("/sdapi/v1/img2img", dict(OK, init_images=["!!!not base64!!!"]), 422, "init_images[0]", "base64"),
    ("/sdapi/v1/img2img", dict(OK, init_images=[NOT_AN_IMAGE]), 422, "init_images[0]", "not an image"),
    ("/sdapi/v1/img2img", dict(OK, init_images=["http://127.0.0.1:1/x.png"]), 422, "init_images[0]", "URL"),
    ("/sdapi/v1/img2img", dict(OK, init_images="abc"), 422, "init_images", "list"),
    ("/sdapi/v1/img2img", dict(OK, init_images=[NOT_AN_IMAGE], mask=NOT_AN_IMAGE * 50), 422, "mask", "inpainting"),
    ("/sdapi/v1/png-info", {"image": "%%%"}, 422, "image", "base64"),
    ("/sdapi/v1/png-info", {}, 422, "image", "required"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "nope"}, 422, "sd_model_checkpoint", "tiny"),
    ("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 99}, 422, "CLIP_stop_at_last_layers", "1 to 12"),
    ("/sdapi/v1/options", b'"text"', 422, "body", "object"),
    ("/api/v1/jobs", {"prompt": "x", "colour": "red"}, 422, "colour", "unknown field"),
    ("/api/v1/jobs", {"prompt": "x", "model": "nope"}, 422, "model", "tiny"),
    ("/api/v1/jobs", {"prompt": "x", "vae": "nope"}, 422, "vae", "Automatic"),
    ("/api/v1/jobs", {"prompt": 12}, 422, "prompt", "string"),
    ("/api/v1/jobs", {"prompt": "x", "sampler_name": "Nope"}, 422, "sampler_name", "DPM++ 2M"),
]


def _post(client, route, body):
    if isinstance(body, bytes):
        return client.post(route, content=body, headers={"content-type": "application/json"})
    return client.post(route, json=body)


def test_each_bad_request_is_a_clear_4xx_then_a_valid_one_succeeds(client, tools):
    for route, body, status, field, word in BAD:
        r = _post(client, route, body)
        assert r.status_code == status, (route, body, r.status_code, r.text)
        err = r.json()
        assert err["field"] == field, (route, body, err)
        assert word.lower() in err["detail"].lower(), (route, body, err)
        assert len(err["detail"]) < 2000   # never echoes a whole image back
    r = client.post("/sdapi/v1/txt2img", json=dict(OK, seed=1))
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_inert_a1111_fields_are_accepted(client):
    """Values A1111 itself ignores (eta without an eta sampler, mask options without a mask, unknown keys)."""
    body = dict(OK, sampler_name="Euler", eta=0.3, s_churn=0, s_tmin=0.5, s_tmax=0, s_noise=1, restore_faces=False,
                tiling=False, styles=[], firstphase_width=0, hr_resize_x=512, hr_sampler_name="Heun",
                override_settings={"CLIP_stop_at_last_layers": 2, "samples_format": "png"},
                comments={"a": 1}, force_task_id="task(abc)", script_args=[1, 2], distilled_cfg_scale=3.5,
                some_future_field={"x": 1})
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert "Clip skip: 2" in json.loads(r.json()["info"])["infotexts"][0]
    assert r.headers["x-sdstack-ignored-fields"] == "distilled_cfg_scale,some_future_field"


def test_oversized_body_is_413():
    import asyncio

    import httpx
    from fastapi import Body, FastAPI

    from sdstack.server.limits import BodyLimitMiddleware

    app = FastAPI()

    @app.post("/x")
    def echo(v: dict = Body(...)):
        return {"n": len(v)}

    async def run():
        transport = httpx.ASGITransport(app=BodyLimitMiddleware(app, max_body=1000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            small = await c.post("/x", json={"a": "b"})
            big = await c.post("/x", json={"a": "b" * 5000})
            return small, big

    small, big = asyncio.run(run())
    assert small.status_code == 200
    assert big.status_code == 413 and big.json()["field"] == "body"


def test_unknown_routes_and_jobs_are_404(client):
    assert client.get("/api/v1/jobs/nope").status_code == 404
    assert client.get("/api/v1/images/123456").status_code == 404
    assert client.get("/sdapi/v1/nope").status_code == 404
    assert client.get("/api/v1/images", params={"limit": 0}).status_code == 422
