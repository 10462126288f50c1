"""Errors meant for people: one clear line, never a traceback.

`UserError` is raised anywhere below the CLI/server for a mistake the user can fix (bad name, bad size,
missing file). The CLI prints its message and exits with code 2; the server turns it into a 4xx JSON body.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; `field` names the offending parameter when there is one."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 422):
        super().__init__(message)
        self.field = field
        self.status = status


class UnsafeCheckpointError(UserError):
    """A checkpoint that needs arbitrary unpickling (code execution) to load."""


class CheckpointKeyError(UserError):
    """A state dict whose keys do not match the architecture (names the missing/unexpected keys)."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...], *, field: str | None = None) -> UserError:
    """The standard message for an unknown sampler/scheduler/model/LoRA name: lists the valid ones."""
    shown = ", ".join(repr(v) for v in list(valid)[:60])
    more = "" if len(valid) <= 60 else f", ... ({len(valid)} in all)"
    return UserError(f"unknown {kind} {name!r}; valid: {shown}{more}", field=field)
