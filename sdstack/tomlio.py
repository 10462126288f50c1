"""Reading TOML files with one-line errors for people (shared by training and dataset configs)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import UserError


def read_toml(path: str | Path, what: str, field: str) -> dict:
    """The parsed TOML table of `path`; missing, unreadable or invalid files raise a UserError naming `what`."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {p}", field=field) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {p} is unreadable: {e}", field=field) from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {p} is not valid TOML: {e}", field=field) from None
