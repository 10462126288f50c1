"""Safe reading of weight files and strict loading into modules.

`.safetensors` first. `.ckpt`/`.pt`/`.bin` only through `torch.load(weights_only=True)`: a file that needs
arbitrary unpickling is refused and no code from it runs. Missing or unexpected keys are errors naming them.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..errors import UnsafeCheckpointError, UserError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES

# Classes that old Lightning checkpoints reference in their pickles but that carry no weights. They are
# allowed as inert stand-ins (same module/name, no behaviour), so such files load without running any code.
_INERT_GLOBALS = [("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")]


def _inert_classes() -> list[type]:
    out = []
    for module, name in _INERT_GLOBALS:
        cls = type(name, (), {"__setstate__": lambda self, state: None})
        cls.__module__ = module
        out.append(cls)
    return out


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` header of a .safetensors file, without reading tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > 100_000_000:
            raise UserError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: corrupt safetensors header") from None
    return dict(header.get("__metadata__") or {})


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a weight file onto the CPU, with the file's metadata (safetensors only)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model file not found: {p}")
    if p.suffix.lower() in SAFE_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        meta = read_safetensors_metadata(p)
        try:
            return load_file(str(p), device="cpu"), meta
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{p}: corrupt or truncated safetensors file ({e})") from None
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return _torch_load_safely(p), {}
    raise UserError(f"{p}: unsupported weight file type {p.suffix!r}; use one of {', '.join(WEIGHT_SUFFIXES)}")


def _torch_load_safely(p: Path) -> dict[str, torch.Tensor]:
    try:
        with torch.serialization.safe_globals(_inert_classes()):
            obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        what = str(e).split("\n")
        hint = next((line.strip() for line in what if "GLOBAL" in line or "Unsupported" in line), what[0][:200])
        raise UnsafeCheckpointError(
            f"{p}: refused: this pickle file needs arbitrary code to load ({hint}); convert it to .safetensors "
            "with a tool you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{p}: corrupt or unreadable checkpoint ({str(e).splitlines()[0][:200]})") from None
    for key in ("state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"{p}: not a state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
