"""The A1111-compatible routes: shapes, defaults and status codes of A1111 v1.10 (reference/a1111.md §2)."""

import json
import threading
import time

import pytest

from sdstack.params import PARAMS


@pytest.fixture(scope="module")
def client(tools, tmp_path_factory):
    data = tools.data_dir(tmp_path_factory.mktemp("a1111"), names=("tiny", "tiny2"))
    with tools.client(data, model="tiny") as c:
        c.data_dir = data
        yield c


def txt2img(client, tools, **kw):
    body = dict(tools.small, prompt="a red star", sampler_name="Euler", **kw)
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_txt2img_response_shape_png_infotext_and_file(client, tools):
    res = txt2img(client, tools, seed=42)
    assert set(res) == {"images", "parameters", "info"}
    assert isinstance(res["info"], str)
    info = json.loads(res["info"])
    for key in ("prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
                "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
                "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
                "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
                "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp",
                "clip_skip", "is_using_inpainting_conditioning", "version"):
        assert key in info, key
    assert info["all_seeds"] == [42] and info["sd_model_name"] == "tiny" and len(info["sd_model_hash"]) == 10
    img = tools.decode(res["images"][0])
    assert img.size == (64, 64)
    assert img.info["parameters"] == info["infotexts"][0]
    assert "Seed: 42" in img.info["parameters"] and "Steps: 2" in img.info["parameters"]
    files = list((client.data_dir / "outputs" / "txt2img-images").glob("*/*-42.png"))
    assert len(files) == 1 and files[0].name.endswith("-42.png") and files[0].name[:5].isdigit()


def test_echoed_parameters_carry_a1111_defaults(client, tools):
    res = txt2img(client, tools, seed=1)
    p = res["parameters"]
    assert p["cfg_scale"] == 7.0 and p["batch_size"] == 1 and p["n_iter"] == 1 and p["seed"] == 1
    assert p["sampler_index"] == "Euler" and p["send_images"] is True and p["save_images"] is False
    assert p["restore_faces"] is None and p["alwayson_scripts"] == {} and p["script_args"] == []


def test_sampler_index_is_used_when_sampler_name_is_null(client, tools):
    body = dict(tools.small, prompt="x", seed=3, sampler_index="Euler a")
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["sampler_name"] == "Euler a"
    info = json.loads(client.post("/sdapi/v1/txt2img", json=dict(tools.small, prompt="x", seed=3)).json()["info"])
    assert info["sampler_name"] == "Euler"   # A1111: sampler_name null -> sampler_index, default "Euler"


def test_openapi_defaults_are_a1111s(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    t2i = schema["StableDiffusionTxt2ImgProcessingAPI"]["properties"]
    assert t2i["steps"]["default"] == 50 and t2i["width"]["default"] == 512 and t2i["height"]["default"] == 512
    assert t2i["sampler_name"].get("default") is None and t2i["sampler_index"]["default"] == "Euler"
    i2i = schema["StableDiffusionImg2ImgProcessingAPI"]["properties"]
    assert i2i["denoising_strength"]["default"] == 0.75 and "init_images" in i2i and "enable_hr" not in i2i
    assert {p.name for p in PARAMS} - {"resize_mode"} <= set(t2i)


def test_batch_and_iterations_seeds(client, tools):
    res = txt2img(client, tools, seed=100, batch_size=2, n_iter=2, steps=1)
    info = json.loads(res["info"])
    assert info["all_seeds"] == [100, 101, 102, 103] and len(res["images"]) == 4
    assert [f"Seed: {s}," in t for s, t in zip(info["all_seeds"], info["infotexts"])] == [True] * 4


def test_send_images_false(client, tools):
    res = txt2img(client, tools, seed=5, send_images=False)
    assert res["images"] == [] and json.loads(res["info"])["all_seeds"] == [5]


def test_img2img(client, tools):
    init = txt2img(client, tools, seed=7)["images"][0]
    body = dict(tools.small, prompt="a blue star", init_images=["data:image/png;base64," + init], seed=8,
                denoising_strength=0.5, sampler_name="Euler")
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    res = r.json()
    info = json.loads(res["info"])
    assert info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0]
    assert res["parameters"]["init_images"] is None   # include_init_images defaults to false
    assert tools.decode(res["images"][0]).size == (64, 64)
    assert list((client.data_dir / "outputs" / "img2img-images").glob("*/*-8.png"))


def test_img2img_without_init_images_is_404(client, tools):
    r = client.post("/sdapi/v1/img2img", json=dict(tools.small, prompt="x"))
    assert r.status_code == 404 and r.json()["field"] == "init_images"


def test_png_info(client, tools):
    img = txt2img(client, tools, seed=11)["images"][0]
    r = client.post("/sdapi/v1/png-info", json={"image": img})
    assert r.status_code == 200
    body = r.json()
    assert body["info"].startswith("a red star\nSteps: 2")
    assert body["parameters"]["Seed"] == "11" and body["parameters"]["Size-1"] == "64"
    assert body["parameters"]["Prompt"] == "a red star"
    assert client.post("/sdapi/v1/png-info", json={"image": ""}).json()["info"] == ""


def test_infotext_fills_fields_not_given(client):
    text = "a green star\nSteps: 3, Sampler: Euler, CFG scale: 5.0, Seed: 77, Size: 64x64"
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"infotext": text}).json()["info"])
    assert (info["prompt"], info["steps"], info["cfg_scale"], info["seed"], info["width"]) == \
        ("a green star", 3, 5.0, 77, 64)


def test_lists(client):
    samplers = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
    assert samplers["DPM++ 2M"]["options"]["scheduler"] == "karras"
    assert "k_euler_a" in samplers["Euler a"]["aliases"]
    schedulers = {s["label"]: s for s in client.get("/sdapi/v1/schedulers").json()}
    assert schedulers["Karras"]["name"] == "karras" and schedulers["Karras"]["default_rho"] == 7.0
    assert set(schedulers["Automatic"]) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    models = client.get("/sdapi/v1/sd-models").json()
    from sdstack.models.registry import builtin_model_path

    builtin = ["shapes-v1"] if builtin_model_path() else []  # the built-in model is listed with the others
    assert [m["model_name"] for m in models] == builtin + ["tiny", "tiny2"]
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert client.get("/sdapi/v1/sd-vae").json() == []
    assert client.get("/sdapi/v1/loras").json() == []
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    mem = client.get("/sdapi/v1/memory").json()
    assert mem["ram"]["total"] > 0 and "cuda" in mem
    for route in ("refresh-checkpoints", "refresh-loras"):
        r = client.post(f"/sdapi/v1/{route}")
        assert r.status_code == 200 and r.json() is None


def test_options_switch_model_and_round_trip(client, tools):
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"].startswith("tiny")
    assert client.post("/sdapi/v1/options", json=opts).status_code == 200      # Open WebUI posts it all back
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert r.status_code == 422 and r.json()["field"] == "sd_model_checkpoint" and "tiny2" in r.json()["detail"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny2"}).json() is None
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny2")
    assert json.loads(txt2img(client, tools, seed=2)["info"])["sd_model_name"] == "tiny2"
    over = txt2img(client, tools, seed=2, override_settings={"sd_model_checkpoint": "tiny"})
    assert json.loads(over["info"])["sd_model_name"] == "tiny"
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"})


def test_progress_idle_shape(client):
    body = client.get("/sdapi/v1/progress").json()
    assert set(body) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert body["progress"] == 0 and body["state"]["job_count"] == 0
    assert set(body["state"]) == {"skipped", "interrupted", "stopping_generation", "job", "job_count",
                                  "job_timestamp", "job_no", "sampling_step", "sampling_steps"}


def test_progress_and_interrupt_return_partial_image(client, tools):
    out = {}
    body = dict(tools.small, prompt="long", steps=400, seed=9, sampler_name="Euler")
    thread = threading.Thread(target=lambda: out.setdefault("r", client.post("/sdapi/v1/txt2img", json=body)))
    thread.start()
    deadline, seen = time.monotonic() + 60, None
    try:
        while time.monotonic() < deadline:
            seen = client.get("/sdapi/v1/progress").json()
            if seen["state"]["sampling_step"] >= 2 and seen["current_image"]:
                break
            time.sleep(0.05)
    finally:
        assert client.post("/sdapi/v1/interrupt").json() == {}
        thread.join(60)
    assert 0 < seen["progress"] < 1 and seen["state"]["job_count"] == 1 and seen["state"]["sampling_steps"] == 400
    assert tools.decode(seen["current_image"]).format == "PNG"
    res = out["r"]
    assert res.status_code == 200
    assert len(res.json()["images"]) == 1 and json.loads(res.json()["info"])["sdstack_interrupted"] is True
    assert client.post("/sdapi/v1/skip").status_code == 200
