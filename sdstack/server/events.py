"""Job events from the worker thread to asyncio listeners (progress streams, waiting A1111 requests)."""

from __future__ import annotations

import asyncio
import contextlib

TERMINAL_EVENTS = ("done", "failed", "cancelled")


class EventHub:
    """`publish` may be called from any thread; subscribers get events on the event loop, in order.

    Each subscriber has a bounded queue; when it is full, the oldest step event is dropped (a slow client
    misses previews, never the final event)."""

    def __init__(self, maxsize: int = 256):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.maxsize = maxsize
        self._subs: dict[str, set[asyncio.Queue]] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def publish(self, job_id: str, event: dict) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._dispatch, job_id, event)

    def _dispatch(self, job_id: str, event: dict) -> None:
        for q in list(self._subs.get(job_id, ())):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(event)

    def subscribe(self, job_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=self.maxsize)
        self._subs.setdefault(job_id, set()).add(q)
        return q

    def unsubscribe(self, job_id: str, q: asyncio.Queue) -> None:
        subs = self._subs.get(job_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self._subs[job_id]
