"""Models the server may use: checkpoints and VAEs *listed* in the data folder (plus the built-in model).

Names from requests are matched only against these lists (title, relative path, file name, stem, short
hash); a request can never make the server open a path of its choosing.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError, unknown_name
from ..paths import DataDir, checkpoint_title, list_checkpoints, list_vaes


class Catalog:
    def __init__(self, data: DataDir, runner, default_model: str | None = None):
        self.data = data
        self.runner = runner            # knows the hashes of models it has loaded
        self.default_name = default_model

    # ------------------------------------------------------------------ checkpoints

    def checkpoints(self) -> list[Path]:
        from ..models.registry import builtin_model_path

        builtin = builtin_model_path()
        found = [p.resolve() for p in list_checkpoints(self.data.checkpoints)]
        return ([builtin.resolve()] if builtin else []) + found

    def sha256(self, path: Path) -> str | None:
        return self.runner.checkpoint_hash(path)

    def title(self, path: Path) -> str:
        sha = self.sha256(path)
        return checkpoint_title(path, self.data.checkpoints, sha[:10] if sha else None)

    def _keys(self, path: Path) -> set[str]:
        rel = path.relative_to(self.data.checkpoints).as_posix() if path.is_relative_to(self.data.checkpoints) \
            else path.name
        keys = {rel, path.name, path.stem if path.is_file() else path.name, self.title(path), str(path)}
        sha = self.sha256(path)
        if sha:
            keys |= {sha[:10], sha, f"{rel} [{sha[:10]}]"}
        return keys

    def resolve_model(self, name: str | None, field: str = "model") -> Path:
        """A listed checkpoint by title/name/short hash; None = the server's default model."""
        if name is None or str(name).strip() == "":
            return self.default_model()
        text = str(name).strip()
        candidates = self.checkpoints()
        for path in candidates:
            if text in self._keys(path):
                return path
        bare = text.split(" [")[0] if text.endswith("]") else text
        for path in candidates:
            if bare in self._keys(path):
                return path
        raise unknown_name("model", text, [self.title(p) for p in candidates] or ["(none installed)"], field=field)

    def default_model(self) -> Path:
        candidates = self.checkpoints()
        if self.default_name:
            return self.resolve_model(self.default_name, field="model")
        if not candidates:
            raise UserError(f"no model is installed: put a checkpoint in {self.data.checkpoints}", field="model",
                            status=503)
        return candidates[0]

    def sd_models(self) -> list[dict]:
        out = []
        for path in self.checkpoints():
            sha = self.sha256(path)
            rel = path.relative_to(self.data.checkpoints) if path.is_relative_to(self.data.checkpoints) \
                else Path(path.name)
            stem = rel.with_suffix("") if path.is_file() else rel
            out.append({"title": self.title(path), "model_name": stem.as_posix().replace("/", "_"),
                        "hash": sha[:10] if sha else None, "sha256": sha, "filename": str(path), "config": None})
        return out

    # ------------------------------------------------------------------ VAEs

    def vaes(self) -> list[Path]:
        return [p.resolve() for p in list_vaes(self.data)]

    def resolve_vae(self, name: str | None, field: str = "vae") -> Path | None:
        """A listed VAE by file name or stem; None / "Automatic" / "None" = the model's own VAE."""
        if name is None or str(name).strip() in ("", "Automatic", "None"):
            return None
        text = str(name).strip()
        for path in self.vaes():
            if text in (str(path), path.name, path.stem, path.stem.split(".vae")[0]):
                return path
        raise unknown_name("VAE", text, ["Automatic", "None", *[p.name for p in self.vaes()]], field=field)
