"""Settings of one `sdstack serve` process (from the command line; no globals)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

DEFAULT_MAX_PIXELS = 2048 * 2048
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 7860
    api_auth: tuple[tuple[str, str], ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    model: str | None = None          # default checkpoint (name, title or path); None = built-in / first found
    models_in_memory: int = 2         # LRU size of loaded models
    device: str = "cpu"
    preview_interval: float = 1.0     # seconds between live previews of a running job (0 = every step)
    max_attempts: int = 3             # a job that was running when the process died this often is failed
    ui: bool = False                  # mount the Gradio web UI at / (`sdstack serve` turns it on)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "sdstack-server.sqlite3"

    @property
    def lock_path(self) -> Path:
        return self.data_dir / ".sdstack-server.lock"


def parse_api_auth(text: str | None) -> tuple[tuple[str, str], ...]:
    """'user:pass,user2:pass2' -> pairs. The password is everything after the first ':' (may contain ':')."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        item = item.strip()
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise UserError("--api-auth takes user:password pairs separated by commas, e.g. 'alice:s3cret'",
                            field="api_auth")
        pairs.append((user, password))
    return tuple(pairs)
