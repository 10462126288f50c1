"""--api-auth covers every route (API, docs, files, progress streams); files only from outputs/."""

import base64

import pytest
from fastapi import HTTPException

from sdstack.errors import UserError
from sdstack.server.auth import check_basic
from sdstack.server.config import parse_api_auth
from sdstack.server.native import safe_output_path

PAIRS = parse_api_auth("alice:s3cret,bob:pa:ss")


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def client(tools, tmp_path_factory):
    data = tools.data_dir(tmp_path_factory.mktemp("secure"))
    with tools.client(data, model="tiny", api_auth=PAIRS) as c:
        c.data_dir = data
        yield c


def test_parse_api_auth():
    assert PAIRS == (("alice", "s3cret"), ("bob", "pa:ss"))
    for bad in ("alice", "alice:", ":pw", "a:b,,c:d"):
        with pytest.raises(UserError):
            parse_api_auth(bad)


def test_check_basic():
    assert check_basic(basic("bob", "pa:ss")["Authorization"].encode(), PAIRS)
    for header in (b"", b"Basic", b"Basic !!!", b"Bearer abc", basic("bob", "pa")["Authorization"].encode(),
                   basic("eve", "s3cret")["Authorization"].encode(), b"Basic " + base64.b64encode(b"alice")):
        assert not check_basic(header, PAIRS)


def test_every_route_requires_credentials(client):
    job = client.post("/api/v1/jobs", json={"prompt": "secret", "steps": 1}, headers=basic("alice", "s3cret"))
    assert job.status_code == 202
    job_id = job.json()["id"]
    routes = [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc"), ("GET", "/sdapi/v1/options"),
              ("POST", "/sdapi/v1/txt2img"), ("GET", "/sdapi/v1/progress"), ("GET", "/sdapi/v1/loras"),
              ("POST", "/sdapi/v1/refresh-loras"), ("GET", "/api/v1/images"), ("GET", f"/api/v1/jobs/{job_id}"),
              ("GET", f"/api/v1/jobs/{job_id}/events"), ("DELETE", f"/api/v1/jobs/{job_id}"),
              ("GET", "/outputs/txt2img-images/x.png"), ("GET", "/no/such/route")]
    for method, path in routes:
        for headers in ({}, basic("alice", "wrong"), basic("mallory", "s3cret")):
            r = client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"].startswith("Basic")
            assert r.json() == {"detail": "Incorrect username or password"}
    assert client.get("/docs", headers=basic("bob", "pa:ss")).status_code == 200
    assert client.get("/sdapi/v1/options", headers=basic("alice", "s3cret")).status_code == 200
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=basic("alice", "s3cret")) as r:
        assert r.status_code == 200 and any(line.startswith("event: done") for line in r.iter_lines())


def test_file_route_serves_only_images_inside_outputs(client, tmp_path):
    outputs = client.data_dir / "outputs"
    (outputs / "txt2img-images").mkdir(parents=True, exist_ok=True)
    (outputs / "notes.txt").write_text("private")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not really")
    (outputs / "txt2img-images" / "link.png").symlink_to(secret)
    auth = basic("alice", "s3cret")
    for path in ("notes.txt", "txt2img-images/link.png", "..%2fsdstack-server.sqlite3", "%2e%2e/%2e%2e/etc/passwd",
                 "txt2img-images/%2e%2e/%2e%2e/sdstack-server.sqlite3", "%5c..%5csdstack-server.sqlite3",
                 "C:%5cWindows%5cwin.ini", "nope.png"):
        assert client.get(f"/outputs/{path}", headers=auth).status_code == 404, path


@pytest.mark.parametrize("rel", ["../x.png", "a/../../x.png", "/etc/passwd", "..\\x.png", "a\\..\\..\\x.png",
                                 "", ".", "a//b.png", "C:/x.png", "x.png\0.txt", "./x.png"])
def test_safe_output_path_rejects(tmp_path, rel):
    (tmp_path / "x.png").write_bytes(b"png")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pytest.raises(HTTPException):
        safe_output_path(outputs, rel)


def test_safe_output_path_accepts_an_image_inside(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "00001-5.png").write_bytes(b"png")
    assert safe_output_path(tmp_path, "d/00001-5.png") == (tmp_path / "d" / "00001-5.png").resolve()


def test_second_server_on_the_same_data_dir_is_refused(client):
    from sdstack.server.config import ServerConfig
    from sdstack.server.state import AppState

    with pytest.raises(UserError, match="another sdstack server"):
        AppState.open(ServerConfig(data_dir=client.data_dir))
