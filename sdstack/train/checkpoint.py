"""Training checkpoints: one folder per save, written atomically (a temp folder renamed into place), holding
`state.pt` (models, optimizer, EMA, LR scheduler, RNG states, step, epoch, loss history; loadable with
`torch.load(weights_only=True)`), `config.toml` (the run's config) and `meta.json`. `<run>/checkpoints/latest`
names the newest one.

    save_checkpoint(run_dir, state, config_toml, step=120, keep=2)
    state = load_checkpoint(find_checkpoint("runs/x"))     # a run folder or a checkpoint folder
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fsio import atomic_write

STATE_FILE = "state.pt"
LATEST = "latest"


def rng_state() -> dict:
    """Python, numpy and torch RNG states, as plain types and tensors (safe for weights_only loading)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))





def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def save_checkpoint(run_dir: str | Path, state: dict, config_toml: str, *, step: int, keep: int = 2) -> Path:
    """Write `state` as checkpoint `step` atomically, point `latest` at it, keep the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    (tmp / "config.toml").write_text(config_toml, encoding="utf-8")
    meta = {"step": state["step"], "epoch": state.get("epoch", 0)}
    (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with open(tmp / STATE_FILE, "rb") as f:
        os.fsync(f.fileno())
    if final.exists():
        old = root / f".old-step-{step:08d}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(root / LATEST, final.name + "\n")
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint); UserError if there is none."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    latest = p / "checkpoints" / LATEST
    if latest.is_file():
        named = p / "checkpoints" / latest.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    found = checkpoint_dirs(p)
    if found:
        return found[-1]
    raise UserError(f"no checkpoint to resume from in {p}", field="resume")


def load_checkpoint(path: str | Path) -> dict:
    ckpt = find_checkpoint(path)
    try:
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"checkpoint {ckpt} is unreadable: {e}", field="resume") from None
