"""The settings A1111 clients read and write through /sdapi/v1/options, persisted in SQLite.

Writable: sd_model_checkpoint (switches the model for jobs submitted afterwards), sd_vae and
CLIP_stop_at_last_layers. The other keys describe fixed behaviour; POSTing them is accepted only with their
current value (so a client may send back the whole dict it read, as Open WebUI does).
"""

from __future__ import annotations

import json
import threading

from ..errors import UserError
from .catalog import Catalog
from .db import Database

WRITABLE = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers")


class ServerOptions:
    def __init__(self, db: Database, catalog: Catalog, models_in_memory: int):
        self.db = db
        self.catalog = catalog
        self.models_in_memory = models_in_memory
        self._lock = threading.Lock()

    def _stored(self, key: str, default=None):
        row = self.db.conn().execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def _store(self, values: dict) -> None:
        with self.db.write() as c:
            for key, value in values.items():
                c.execute("INSERT INTO settings(key, value) VALUES (?, ?) "
                          "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value)))

    # ------------------------------------------------------------------ current values

    def model_path(self):
        stored = self._stored("sd_model_checkpoint")
        if stored:
            for path in self.catalog.checkpoints():
                if str(path) == stored:
                    return path
        return self.catalog.default_model()

    def vae_path(self):
        stored = self._stored("sd_vae")
        return next((p for p in self.catalog.vaes() if str(p) == stored), None) if stored else None

    def clip_skip(self) -> int:
        return int(self._stored("CLIP_stop_at_last_layers", 1))

    def get_all(self) -> dict:
        try:
            model = self.model_path()
        except UserError:
            model = None
        sha = self.catalog.sha256(model) if model else None
        vae = self.vae_path()
        return {
            "sd_model_checkpoint": self.catalog.title(model) if model else None,
            "sd_checkpoint_hash": sha,
            "sd_vae": vae.name if vae else "Automatic",
            "CLIP_stop_at_last_layers": self.clip_skip(),
            "sd_checkpoints_limit": self.models_in_memory,
            "samples_format": "png",
            "grid_format": "png",
            "samples_save": True,
            "randn_source": "CPU",
            "eta_noise_seed_delta": 0,
            "eta_ancestral": 1.0,
            "eta_ddim": 0.0,
            "live_previews_enable": True,
            "outdir_txt2img_samples": "outputs/txt2img-images",
            "outdir_img2img_samples": "outputs/img2img-images",
        }

    # ------------------------------------------------------------------ changes

    def check(self, values: dict, prefix: str = "") -> dict:
        """Validate settings (POST /options or override_settings); returns {model, vae, clip_skip} changes."""
        current = None
        out: dict = {}
        for key, value in values.items():
            name = f"{prefix}{key}"
            if key == "sd_model_checkpoint":
                out["model"] = self.catalog.resolve_model(value, field=name)
            elif key == "sd_vae":
                out["vae"] = self.catalog.resolve_vae(value, field=name)
            elif key == "CLIP_stop_at_last_layers":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
                        or not 1 <= value <= 12:
                    raise UserError(f"{name} must be a whole number from 1 to 12, got {value!r}", field=name)
                out["clip_skip"] = int(value)
            else:
                current = current if current is not None else self.get_all()
                if key not in current:
                    raise UserError(f"unknown setting {key!r}; supported: {', '.join(current)}", field=name)
                if value != current[key]:
                    raise UserError(f"{name} cannot be changed in sdstack (it is {current[key]!r}); "
                                    f"settable: {', '.join(WRITABLE)}", field=name)
        return out

    def set_many(self, values: dict) -> None:
        """POST /options: validate everything first, then store (all or nothing)."""
        with self._lock:
            changes = self.check(values)
            stored = {}
            if "model" in changes:
                stored["sd_model_checkpoint"] = str(changes["model"])
            if "vae" in changes:
                stored["sd_vae"] = str(changes["vae"]) if changes["vae"] else None
            if "clip_skip" in changes:
                stored["CLIP_stop_at_last_layers"] = changes["clip_skip"]
            if stored:
                self._store(stored)
