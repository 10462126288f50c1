"""What the worker thread does with a job: load the model (LRU cache), generate, write the images.

Only the worker thread calls into this class's model-touching methods; see queue.py.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

from ..errors import UserError
from ..paths import DataDir
from .config import ServerConfig
from .jobs import ImagePlan, JobStore

log = logging.getLogger(__name__)


def job_facts(bundle) -> dict:
    return {"model_name": bundle.name, "model_hash": bundle.shorthash, "model_sha256": bundle.sha256,
            "vae_name": bundle.vae_name, "vae_hash": bundle.vae_sha256[:10] if bundle.vae_sha256 else None}


class Runner:
    def __init__(self, config: ServerConfig, data: DataDir, store: JobStore, hash_cache):
        from ..models.registry import ModelCache

        self.config = config
        self.data = data
        self.store = store
        self.hash_cache = hash_cache
        self.models = ModelCache(max(1, config.models_in_memory))
        self._embeddings: dict[tuple, object] = {}
        self._lock = threading.Lock()
        self.known_hashes: dict[str, str] = {}     # checkpoint path -> sha256, learnt when loaded
        self.embeddings_info: dict | None = None   # A1111 /embeddings body for the last model used

    def bundle(self, model: str, vae: str | None):
        from ..models.loader import load_model

        def load():
            log.info("loading model %s", model)
            return load_model(model, vae=vae, device=self.config.device, hash_cache=self.hash_cache)

        b = self.models.get((model, vae), load)
        with self._lock:
            self.known_hashes[model] = b.sha256
        return b

    def embeddings(self, bundle, key: tuple):
        from ..models.embeddings import EmbeddingLibrary

        if not self.data.embeddings.is_dir():
            return None
        lib = self._embeddings.get(key)
        if lib is None or len(self._embeddings) > 8:
            self._embeddings = {k: v for k, v in self._embeddings.items() if k == key}
            lib = self._embeddings[key] = EmbeddingLibrary(self.data.embeddings, bundle, hash_cache=self.hash_cache)
        lib.refresh()
        self.embeddings_info = lib.api_info()
        return lib

    def run(self, job: dict, control, on_step):
        """Generate a claimed job's images; returns (GenerationResult, model facts)."""
        from PIL import Image

        from ..engine.generate import generate
        from ..params import make_params

        bundle = self.bundle(job["model"], job["vae"])
        params = make_params(**job["params"])
        init = None
        if job["kind"] == "img2img":
            init = [Image.open(io.BytesIO(png)).convert("RGB") for png in self.store.inputs(job["id"])]
            if not init:
                raise UserError("img2img job without init images", field="init_images")
        emb = self.embeddings(bundle, (job["model"], job["vae"]))
        result = generate(bundle, params, init_images=init, lora_dir=self.data.lora, embeddings=emb,
                          control=control, on_step=lambda pr: on_step(pr), hash_cache=self.hash_cache)
        return result, job_facts(bundle)

    def save(self, job: dict, result, facts: dict) -> tuple[list[int], dict[int, str]]:
        """Reserve names (pending rows), write each file atomically, hash it; the caller marks them done."""
        from ..metadata.images import save_image_atomic
        from ..models.hashing import sha256_file
        from ..outputs import next_number, output_folder

        outputs = self.data.outputs
        folder = output_folder(outputs, job["kind"] == "img2img")
        folder.mkdir(parents=True, exist_ok=True)
        n = next_number(folder)
        plans = []
        for i, (img, seed, sub, info) in enumerate(zip(result.images, result.seeds, result.subseeds,
                                                       result.infotexts)):
            rel = (folder / f"{n + i:05d}-{seed}.png").relative_to(outputs).as_posix()
            plans.append(ImagePlan(i, rel, seed, sub, info, img.width, img.height))
        ids = self.store.reserve_images(job, plans, facts)
        hashes: dict[int, str] = {}
        try:
            for image_id, plan, img in zip(ids, plans, result.images):
                path = outputs / plan.path
                save_image_atomic(img, path, plan.infotext)
                hashes[image_id] = sha256_file(path)
        except BaseException:
            self.store.discard_pending(job["id"], outputs)
            raise
        return ids, hashes

    def checkpoint_hash(self, path: Path) -> str | None:
        """The sha256 of a checkpoint if known without reading it (loaded before, or in the hash cache)."""
        with self._lock:
            known = self.known_hashes.get(str(path))
        if known:
            return known
        peek = getattr(self.hash_cache, "peek", None)
        if peek is not None and path.is_file():
            return peek(path)
        return None
