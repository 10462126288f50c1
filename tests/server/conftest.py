"""Shared fixtures for the server tests: a tiny random-weight model, data folders, clients, a real server."""

import base64
import contextlib
import io
import shutil
import socket
import threading
import time
import types

import pytest


@pytest.fixture(scope="session")
def model_template(tmp_path_factory):
    from sdstack.models.tiny import save_diffusers_folder, tiny_bundle

    return save_diffusers_folder(tiny_bundle("sd1"), tmp_path_factory.mktemp("model") / "tiny")


def _data_dir(template, base, names=("tiny",)):
    for name in names:
        shutil.copytree(template, base / "models" / "Stable-diffusion" / name)
    return base


@contextlib.contextmanager
def _client(data_dir, **config):
    from fastapi.testclient import TestClient

    from sdstack.server.app import create_app
    from sdstack.server.config import ServerConfig

    config.setdefault("preview_interval", 0.0)
    app = create_app(ServerConfig(data_dir=data_dir, **config))
    with TestClient(app) as client:
        yield client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _real_server(data_dir, **config):
    """uvicorn on a free loopback port in a thread; yields the port; stops it on exit."""
    import uvicorn

    from sdstack.server.app import create_app
    from sdstack.server.config import ServerConfig

    port = _free_port()
    config.setdefault("preview_interval", 0.0)
    app = create_app(ServerConfig(data_dir=data_dir, port=port, **config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert server.started, "server did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str):
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def wait_job(client, job_id, timeout=60.0, statuses=("done", "failed", "cancelled")):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not finished in {timeout}s: {job}")


@pytest.fixture(scope="session")
def tools(model_template):
    return types.SimpleNamespace(
        data_dir=lambda base, names=("tiny",): _data_dir(model_template, base, names),
        client=_client, real_server=_real_server, free_port=_free_port, png_b64=png_b64, decode=decode,
        wait_job=wait_job, small={"width": 64, "height": 64, "steps": 2})
