"""Fixtures for the web UI tests: a tiny model, a real server with the UI and --api-auth, headless Chromium."""

import os
import shutil
import types
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

AUTH = ("alice", "s3cret:with-colon")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def make_data_dir(template, base: Path) -> Path:
    shutil.copytree(template, base / "models" / "Stable-diffusion" / "tiny")
    return base


@pytest.fixture(scope="module")
def ui_server(tiny_model_template, live_server, tmp_path_factory):
    data_dir = make_data_dir(tiny_model_template, tmp_path_factory.mktemp("ui-data"))
    with live_server(data_dir, ui=True, api_auth=(AUTH,)) as port:
        yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}", auth=AUTH, data_dir=data_dir)


def _chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _missing(reason: str):
    """Skip where a browser truly cannot be had; in CI (CI=true) the browser tests must run, so fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser tests; `make test` installs Debian's chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium_path():
    path = _chromium()
    if path is None:
        _missing("no chromium on this machine and `make browser` could not install it "
                 "(apt-get install chromium)")
    return path


@pytest.fixture(scope="session")
def browser(chromium_path, tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:
        # launch() gives every run a fresh, temporary --user-data-dir
        b = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, ui_server):
    """A page logged in with HTTP Basic (the UI is behind --api-auth like every route)."""
    user, password = ui_server.auth
    context = browser.new_context(http_credentials={"username": user, "password": password},
                                  viewport={"width": 1400, "height": 1100})
    outside: list[str] = []
    context.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
        (ui_server.url, "data:", "blob:")) else None)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.outside_requests = outside
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
