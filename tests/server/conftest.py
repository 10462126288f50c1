"""Shared fixtures for the server tests: a tiny random-weight model, data folders, clients, a real server."""

import base64
import contextlib
import io
import shutil
import time
import types

import pytest


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
def tools(tiny_model_template, live_server, port_finder):
    return types.SimpleNamespace(
        data_dir=lambda base, names=("tiny",): _data_dir(tiny_model_template, base, names),
        client=_client, real_server=live_server, free_port=port_finder, png_b64=png_b64, decode=decode,
        wait_job=wait_job, small={"width": 64, "height": 64, "steps": 2})
