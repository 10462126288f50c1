import contextlib
import os
import socket
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture(scope="session")
def tiny_sd1():
    from sdstack.models.tiny import tiny_bundle

    return tiny_bundle("sd1")


@pytest.fixture(scope="session")
def tiny_model_template(tmp_path_factory):
    """A tiny random SD 1.x model as a diffusers folder (copy it into a data dir; do not modify it)."""
    from sdstack.models.tiny import save_diffusers_folder, tiny_bundle

    return save_diffusers_folder(tiny_bundle("sd1"), tmp_path_factory.mktemp("model") / "tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _live_server(data_dir, **config):
    """uvicorn serving create_app(ServerConfig(...)) on a free loopback port in a thread; yields the port and
    stops the server on exit."""
    import uvicorn

    from sdstack.server.app import create_app
    from sdstack.server.config import ServerConfig

    port = free_port()
    config.setdefault("preview_interval", 0.0)
    app = create_app(ServerConfig(data_dir=data_dir, port=port, **config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert server.started, "server did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def live_server():
    """`with live_server(data_dir, **ServerConfig fields) as port:` a real server for the test."""
    return _live_server


@pytest.fixture(scope="session")
def port_finder():
    return free_port
