"""The native API: jobs (submit / get / cancel), the progress stream, the gallery, re-submission, OpenAPI."""

import base64
import hashlib
import json

import numpy as np
import pytest

from sdstack.params import PARAMS


@pytest.fixture(scope="module")
def client(tools, tmp_path_factory):
    data = tools.data_dir(tmp_path_factory.mktemp("native"))
    with tools.client(data, model="tiny") as c:
        c.data_dir = data
        yield c


def submit(client, **kw):
    r = client.post("/api/v1/jobs", json={"steps": 2, **kw})
    assert r.status_code == 202, r.text
    return r.json()


def test_job_lifecycle_and_image_record(client, tools):
    created = submit(client, prompt="a red star", seed=21)
    assert created["status"] == "queued" and created["url"] == f"/api/v1/jobs/{created['id']}"
    job = tools.wait_job(client, created["id"])
    assert job["status"] == "done" and job["attempts"] == 1 and job["params"]["seed"] == 21
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    (img,) = job["images"]
    assert img["seed"] == 21 and img["model_name"] == "tiny" and len(img["model_hash"]) == 10
    assert img["path"].startswith("txt2img-images/") and img["path"].endswith("-21.png")
    data = (client.data_dir / "outputs" / img["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == img["file_sha256"]
    served = client.get(img["url"])
    assert served.status_code == 200 and served.content == data and served.headers["content-type"] == "image/png"
    assert client.get(f"/api/v1/images/{img['id']}").json()["infotext"] == img["infotext"]


def test_random_seed_is_fixed_at_submission(client):
    job = client.get(submit(client, prompt="random seed")["url"]).json()
    assert 0 <= job["params"]["seed"] < 2**32 and job["params"]["subseed"] != -1


def test_progress_stream_has_previews_and_ends_with_done(client, tools):
    blocker = submit(client, prompt="blocker", seed=4, steps=40)["id"]   # keeps the next job queued a moment
    job_id = submit(client, prompt="streamed", seed=3, steps=3)["id"]
    events = []
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    names = [n for n, _ in events]
    assert names == ["status", "started", "progress", "progress", "progress", "done"], names
    assert events[0][1]["status"] == "queued" and events[0][1]["position"] in (0, 1)
    steps = [e for n, e in events if n == "progress"]
    assert [e["step"] for e in steps] == [1, 2, 3] and {e["total"] for e in steps} == {3}
    for e in steps:   # --preview-interval 0 in tests: a preview with every step
        assert e["preview"].startswith("data:image/png;base64,")
        assert tools.decode(e["preview"].split(",", 1)[1]).format == "PNG"
    assert tools.wait_job(client, blocker)["status"] == "done"


def test_cancel_queued_and_running(client, tools):
    long_job = submit(client, prompt="long", steps=400, seed=1)["id"]
    queued = submit(client, prompt="waiting", seed=2)["id"]
    r = client.delete(f"/api/v1/jobs/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    tools.wait_job(client, long_job, statuses=("running",))
    assert client.delete(f"/api/v1/jobs/{long_job}").status_code == 200
    done = tools.wait_job(client, long_job)
    assert done["status"] == "cancelled" and done["images"] == []
    assert client.delete(f"/api/v1/jobs/{long_job}").status_code == 409
    assert client.delete("/api/v1/jobs/nope").status_code == 404
    assert client.get("/api/v1/images?q=waiting").json()["total"] == 0


def test_gallery_search(client, tools):
    for prompt, seed in (("a blue circle", 31), ("a green square", 32), ("blue and green", 33)):
        tools.wait_job(client, submit(client, prompt=prompt, seed=seed)["id"])
    found = client.get("/api/v1/images", params={"q": "blue"}).json()
    assert sorted(i["seed"] for i in found["items"]) == [31, 33] and found["total"] == 2
    assert [i["seed"] for i in client.get("/api/v1/images", params={"q": "green square"}).json()["items"]] == [32]
    for tricky in ('"', "AND", "a OR (", "NEAR(", "*", "col:blue", "'; DROP TABLE images; --"):
        assert client.get("/api/v1/images", params={"q": tricky}).status_code == 200
    assert client.get("/api/v1/images", params={"model": "tiny"}).json()["total"] >= 3
    assert client.get("/api/v1/images", params={"model": "other"}).json()["total"] == 0
    today = found["items"][0]["created_at"][:10]
    assert client.get("/api/v1/images", params={"date": today}).json()["total"] >= 3
    assert client.get("/api/v1/images", params={"date": "1999-01-01"}).json()["total"] == 0
    assert client.get("/api/v1/images", params={"since": "2999-01-01"}).json()["total"] == 0
    r = client.get("/api/v1/images", params={"date": "yesterday"})
    assert r.status_code == 422 and r.json()["field"] == "date"
    page = client.get("/api/v1/images", params={"limit": 1, "offset": 1}).json()
    assert len(page["items"]) == 1 and page["total"] >= 3


def test_resubmit_reproduces_the_image(client, tools):
    job = tools.wait_job(client, submit(client, prompt="again", seed=41)["id"])
    img = job["images"][0]
    again = client.post(f"/api/v1/images/{img['id']}/resubmit")
    assert again.status_code == 202
    img2 = tools.wait_job(client, again.json()["id"])["images"][0]
    assert img2["params"] == img["params"] and img2["id"] != img["id"]
    a, b = (np.asarray(tools.decode(base64.b64encode(client.get(i["url"]).content).decode())) for i in (img, img2))
    assert np.array_equal(a, b)
    changed = client.post(f"/api/v1/images/{img['id']}/resubmit", json={"seed": 42})
    assert tools.wait_job(client, changed.json()["id"])["images"][0]["seed"] == 42
    bad = client.post(f"/api/v1/images/{img['id']}/resubmit", json={"bogus": 1})
    assert bad.status_code == 422 and bad.json()["field"] == "bogus"
    assert client.post("/api/v1/images/999999/resubmit").status_code == 404


def test_img2img_job(client, tools):
    init = tools.wait_job(client, submit(client, prompt="init", seed=51)["id"])["images"][0]
    b64 = base64.b64encode(client.get(init["url"]).content).decode()
    job = tools.wait_job(client, submit(client, prompt="from init", seed=52, init_images=[b64])["id"])
    assert job["kind"] == "img2img" and job["images"][0]["path"].startswith("img2img-images/")
    again = client.post(f"/api/v1/images/{job['images'][0]['id']}/resubmit")
    assert tools.wait_job(client, again.json()["id"])["kind"] == "img2img"


def test_openapi_documents_every_route_from_params(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for route in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/interrupt",
                  "/sdapi/v1/skip", "/sdapi/v1/options", "/sdapi/v1/sd-models", "/sdapi/v1/sd-vae",
                  "/sdapi/v1/samplers", "/sdapi/v1/schedulers", "/sdapi/v1/loras", "/sdapi/v1/embeddings",
                  "/sdapi/v1/png-info", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras",
                  "/sdapi/v1/memory", "/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/events",
                  "/api/v1/images", "/api/v1/images/{image_id}/resubmit", "/outputs/{rel}"):
        assert route in paths, route
    job = doc["components"]["schemas"]["JobRequest"]["properties"]
    assert {p.name for p in PARAMS} | {"model", "vae", "init_images"} == set(job)
    assert job["steps"]["default"] == 20 and job["steps"]["maximum"] == 1000
    assert client.get("/docs").status_code == 200
