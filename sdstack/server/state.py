"""Everything one server process holds, created by `AppState.open` and passed to the routes (no globals)."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from ..errors import UserError
from ..paths import DataDir
from .catalog import Catalog
from .config import ServerConfig
from .db import Database
from .events import TERMINAL_EVENTS, EventHub
from .jobs import TERMINAL, JobStore
from .options import ServerOptions
from .queue import JobQueue
from .runner import Runner


@dataclass
class AppState:
    config: ServerConfig
    data: DataDir
    db: Database
    store: JobStore
    runner: Runner
    catalog: Catalog
    options: ServerOptions
    hub: EventHub
    queue: JobQueue
    loras: object
    lock_fd: int | None = None
    closing: bool = False

    @classmethod
    def open(cls, config: ServerConfig) -> "AppState":
        from ..models.hashing import HashCache
        from ..models.lora import LoraLibrary

        data = DataDir.at(config.data_dir)
        data.root.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(config.lock_path)
        db = Database(config.db_path).open()
        store = JobStore(db)
        hash_cache = HashCache(data.hash_cache)
        runner = Runner(config, data, store, hash_cache)
        catalog = Catalog(data, runner, config.model)
        options = ServerOptions(db, catalog, config.models_in_memory)
        hub = EventHub()
        queue = JobQueue(store, runner, publish=hub.publish, preview_interval=config.preview_interval,
                         outputs=data.outputs, max_attempts=config.max_attempts)
        return cls(config, data, db, store, runner, catalog, options, hub, queue,
                   LoraLibrary(data.lora, hash_cache=hash_cache), lock_fd)

    def start(self, loop: asyncio.AbstractEventLoop) -> list[str]:
        self.hub.bind(loop)
        return self.queue.start()

    def close(self) -> None:
        self.closing = True
        self.queue.stop()
        self.db.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)      # releases the flock
            self.lock_fd = None

    async def wait_job(self, job_id: str) -> dict:
        """Wait until a job is finished (done / failed / cancelled); returns its row."""
        q = self.hub.subscribe(job_id)
        try:
            while True:
                job = self.store.get(job_id)
                if job is None or job["status"] in TERMINAL:
                    return job
                if self.closing:
                    raise UserError(f"the server is shutting down; job {job_id} stays queued and runs after a "
                                    "restart (GET /api/v1/jobs/{id})", status=503)
                try:
                    while (await asyncio.wait_for(q.get(), timeout=1.0))["event"] not in TERMINAL_EVENTS:
                        pass
                except asyncio.TimeoutError:
                    pass
        finally:
            self.hub.unsubscribe(job_id, q)


def _lock(path) -> int:
    """An exclusive lock on the data folder: one server (one worker) per folder. The kernel drops it when the
    process dies, even by SIGKILL."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # not POSIX: no folder lock (one server per data folder is then up to the user)
        logging.getLogger(__name__).warning("cannot lock %s on this platform", path)
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"another sdstack server is already using {path.parent}; stop it or use another "
                        "--data-dir") from None
    return fd
