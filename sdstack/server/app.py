"""The FastAPI application: A1111-compatible /sdapi/v1, native /api/v1, /outputs files, docs at /docs, and
(with config.ui) the Gradio web UI at /."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from .. import __version__
from .config import ServerConfig

log = logging.getLogger(__name__)


def create_app(config: ServerConfig, state=None) -> FastAPI:
    """Build the app; the state (database, queue, worker) opens here and starts/stops with the app."""
    from .a1111 import a1111_router
    from .a1111_info import info_router
    from .auth import BasicAuthMiddleware
    from .errors import install_error_handlers
    from .limits import BodyLimitMiddleware
    from .native import files_router, native_router
    from .state import AppState

    state = state or AppState.open(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        recovered = state.start(asyncio.get_running_loop())
        if recovered:
            log.warning("re-queued %d job(s) that were running when the server stopped", len(recovered))
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.close)

    app = FastAPI(title="sdstack", version=__version__, lifespan=lifespan,
                  description="Local-first Stable Diffusion. `/sdapi/v1` speaks AUTOMATIC1111's API (v1.10); "
                              "`/api/v1` is sdstack's own job queue and gallery. Generation fields come from "
                              "one schema (sdstack.params.PARAMS).")
    app.state.sdstack = state
    install_error_handlers(app)
    app.include_router(a1111_router(state))
    app.include_router(info_router(state))
    app.include_router(native_router(state))
    app.include_router(files_router(state))
    if config.ui:   # the Gradio web UI at /, mounted after every API route so those match first
        from .ui import mount_ui

        mount_ui(app, state)
    app.add_middleware(BodyLimitMiddleware)
    if config.api_auth:   # added last = outermost: nothing runs before the credentials are checked
        app.add_middleware(BasicAuthMiddleware, pairs=config.api_auth)
    return app
