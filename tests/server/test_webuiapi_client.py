"""A real third-party A1111 client (webuiapi from PyPI) against a real uvicorn server on loopback, with auth."""

import socket

import pytest

webuiapi = pytest.importorskip("webuiapi")

USER, PASSWORD = "alice", "pa:ss"   # ':' inside the password is fine (split on the first ':')


@pytest.fixture(scope="module")
def server(tools, tmp_path_factory):
    from sdstack.server.config import parse_api_auth

    data = tools.data_dir(tmp_path_factory.mktemp("webuiapi"), names=("tiny", "tiny2"))
    with tools.real_server(data, model="tiny", api_auth=parse_api_auth(f"{USER}:{PASSWORD},bob:other")) as port:
        yield port, data


@pytest.fixture(scope="module")
def api(server):
    port, _ = server
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=2, username=USER,
                             password=PASSWORD)


def test_txt2img_img2img_png_info(api):
    res = api.txt2img(prompt="a red star", width=64, height=64, seed=5)
    assert res.image.size == (64, 64)
    assert res.info["all_seeds"] == [5] and res.info["sampler_name"] == "Euler a"
    assert res.parameters["steps"] == 2 and res.parameters["eta"] == 1.0
    assert "Seed: 5" in res.image.info["parameters"]
    res2 = api.img2img(images=[res.image], prompt="a blue star", width=64, height=64, seed=6,
                       denoising_strength=0.5)
    assert res2.image.size == (64, 64) and res2.info["all_seeds"] == [6]
    info = api.png_info(res.image)
    assert info.info.startswith("a red star\n") and info.parameters["Seed"] == "5"


def test_models_options_and_lists(api):
    from sdstack.models.registry import builtin_model_path

    builtin = ["shapes-v1"] if builtin_model_path() else []  # the built-in model is listed with the others
    assert sorted(m["model_name"] for m in api.get_sd_models()) == sorted(builtin + ["tiny", "tiny2"])
    api.util_set_model("tiny2")
    assert api.util_get_current_model().startswith("tiny2")
    assert api.txt2img(prompt="x", width=64, height=64, seed=1).info["sd_model_name"] == "tiny2"
    api.util_set_model("tiny")
    api.util_wait_for_ready(check_interval=0.1)
    assert "Euler a" in api.util_get_sampler_names()
    assert "Karras" in [s["label"] for s in api.get_schedulers()]
    assert api.get_loras() == [] and api.get_sd_vae() == []
    assert set(api.get_embeddings()) == {"loaded", "skipped"}
    assert api.get_memory()["ram"]["total"] > 0
    assert api.refresh_checkpoints() is None
    assert api.interrupt() == {} and api.skip() is None
    assert api.get_progress()["state"]["job_count"] == 0


def test_wrong_password_is_refused(server):
    port, _ = server
    bad = webuiapi.WebUIApi(host="127.0.0.1", port=port, username=USER, password="nope")
    with pytest.raises(Exception):
        bad.txt2img(prompt="x", width=64, height=64)
    assert bad.session.get(f"{bad.baseurl}/options").status_code == 401


def _raw_get(port: int, path: str, auth: str) -> int:
    """Send the path exactly as written (no client-side normalisation of ../)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n"
                  "Connection: close\r\n\r\n".encode())
        head = s.recv(4096).decode("latin-1")
    return int(head.split(" ", 2)[1])


@pytest.mark.parametrize("path", [
    "/outputs/../sdstack-server.sqlite3", "/outputs/%2e%2e/sdstack-server.sqlite3",
    "/outputs/txt2img-images/../../sdstack-server.sqlite3", "/outputs/..%2fsdstack-server.sqlite3",
    "/outputs/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/outputs/..%5c..%5cetc%5cpasswd", "/outputs//etc/passwd",
    "/outputs/%252e%252e/sdstack-server.sqlite3", "/outputs/../../../../etc/passwd",
])
def test_path_traversal_over_the_wire(server, path):
    import base64

    port, _ = server
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert _raw_get(port, path, auth) in (400, 404)


def test_generated_file_is_served_over_the_wire(server, api):
    import base64

    import requests

    port, _ = server
    api.txt2img(prompt="served", width=64, height=64, seed=12)
    items = requests.get(f"http://127.0.0.1:{port}/api/v1/images", params={"q": "served"},
                         auth=(USER, PASSWORD), timeout=10).json()["items"]
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert _raw_get(port, items[0]["url"], auth) == 200
    assert _raw_get(port, items[0]["url"], base64.b64encode(b"alice:wrong").decode()) == 401
