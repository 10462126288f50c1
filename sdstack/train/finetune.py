"""`sdstack finetune lora|dreambooth|textual-inversion|full`: teach an existing model (SD 1.x, 2.x, SDXL or the
built-in one) a subject or a style from a folder of images, on the shared training loop (`loop.py`: Accelerate,
deterministic batches, exact resume, EMA, bf16 autocast, gradient accumulation, progress, checkpoints).

Methods:
- lora: peft LoRA layers on the UNet (and optionally the text encoders); saved as a kohya `.safetensors`.
- dreambooth: the UNet (and optionally the text encoder) trains; with prior preservation, class images made by
  the base model are mixed in as kohya's regularisation subset and their loss weighs `prior_loss_weight`.
- textual_inversion: only the new token's vectors train; saved in A1111's embedding format, named by the token.
  A lora, dreambooth or full run given a token trains its vectors too (pivotal tuning): written as
  `embeddings/<token>.safetensors`, and a LoRA file also carries them (`bundle_emb.*`).
- full: the UNet (and optionally the text encoders) trains; saved as a diffusers folder and a single file.

Data: `sdstack.data.dataset` (kohya folders, metadata.jsonl, dataset TOML, aspect buckets, caption options),
latents and text-encoder outputs cached on disk by `sdstack.data.cache`. A checkpoint holds only what trains.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import time
from pathlib import Path

import torch

from ..errors import UserError
from .diffusion import diffusion_loss, training_alphas
from .finetune_config import PRIOR_METHODS, FinetuneConfig, class_prompts
from .loop import Task, seed_everything, train
from .plots import image_grid, save_png
from ..fsio import atomic_path, atomic_write

log = logging.getLogger(__name__)

PEFT_ADAPTER = "default"
VALIDATION_ITEMS = 32  # at most this many held-out images enter the validation loss


# ---------------------------------------------------------------------------------------------- text


class TrainingText:
    """Captions -> token ids per text encoder (first 75 tokens, A1111/kohya framing) and, for textual inversion,
    a map of where the new token's vectors go (B x 77: 0 = keep, k = vector k-1)."""

    def __init__(self, bundle, trigger: str | None = None, num_vectors: int = 1):
        self.bundle = bundle
        self.tokenizers = bundle.tokenizers
        self.trigger = tuple(bundle.tokenizers[0].encode(trigger)) if trigger else ()
        self.num_vectors = num_vectors

    def _tokens(self, caption: str) -> tuple[list[int], list[int]]:
        ids = self.tokenizers[0].encode(caption)
        if not self.trigger:
            return ids[:75], [0] * min(75, len(ids))
        out, slots, i, n = [], [], 0, len(self.trigger)
        while i < len(ids):
            if tuple(ids[i:i + n]) == self.trigger:
                out += [0] * self.num_vectors
                slots += list(range(1, self.num_vectors + 1))
                i += n
            else:
                out.append(ids[i])
                slots.append(0)
                i += 1
        return out[:75], slots[:75]

    def __call__(self, captions: list[str]) -> dict:
        per_encoder = [[] for _ in self.tokenizers]
        slots_all = []
        for caption in captions:
            tokens, slots = self._tokens(caption)
            for k, tok in enumerate(self.tokenizers):
                ids = [tok.bos_token_id] + tokens + [tok.eos_token_id]
                ids += [tok.pad_token_id] * (77 - len(ids))
                per_encoder[k].append(ids)
            slots_all.append([0] + slots + [0] * (76 - len(slots)))
        return {"ids": [torch.tensor(x) for x in per_encoder], "slots": torch.tensor(slots_all)}


def encode_text(bundle, encoders, ids: list[torch.Tensor], slots: torch.Tensor | None, vectors, clip_skip: int):
    """Differentiable text conditioning as the engine computes it (`TextConditioner`): context B x 77 x C and,
    for SDXL, the pooled embedding. `vectors[k]` (n x width) replace the rows `slots` points at in encoder k."""
    from ..prompts.conditioning import final_layer_norm

    hidden, pooled = [], None
    for k, enc in enumerate(encoders):
        device = next(enc.parameters()).device
        hook = None
        if vectors is not None and slots is not None:  # also without a slot, so the vectors are in the graph
            table, where = vectors[k], slots.to(device)

            def replace(module, inputs, output, table=table, where=where):
                rows = torch.cat([output.new_zeros(1, output.shape[-1]), table.to(output.dtype)])[where]
                return torch.where((where > 0).unsqueeze(-1), rows, output)

            hook = enc.get_input_embeddings().register_forward_hook(replace)
        try:
            out = enc(input_ids=ids[k].to(device), output_hidden_states=True)
        finally:
            if hook is not None:
                hook.remove()
        if bundle.family == "sdxl":
            hidden.append(out.hidden_states[-2])
            if k == 1:
                pooled = out.text_embeds
        else:
            hidden.append(final_layer_norm(enc)(out.hidden_states[-max(1, clip_skip)]))
    return torch.cat(hidden, dim=-1), pooled


class FinetuneModule(torch.nn.Module):
    """What DDP wraps: the UNet, the text encoders and the new token vectors; forward -> UNet prediction."""

    def __init__(self, bundle, vectors: list[torch.Tensor] | None, clip_skip: int):
        super().__init__()
        self.family, self.clip_skip, self._bundle = bundle.family, clip_skip, [bundle]
        self.unet = bundle.unet
        self.text_encoders = torch.nn.ModuleList(bundle.text_encoders)
        self.vectors = torch.nn.ParameterList(vectors) if vectors else None

    def forward(self, noisy, timesteps, text: dict, time_ids: torch.Tensor | None = None):
        if "context" in text:  # cached text-encoder outputs
            context, pooled = text["context"], text.get("pooled")
        else:
            context, pooled = encode_text(self._bundle[0], self.text_encoders, text["ids"], text.get("slots"),
                                          self.vectors, self.clip_skip)
        added = None
        if self.family == "sdxl":
            added = {"text_embeds": pooled.to(noisy.dtype), "time_ids": time_ids.to(noisy.device, noisy.dtype)}
        return self.unet(noisy, timesteps, encoder_hidden_states=context.to(noisy.dtype),
                         added_cond_kwargs=added).sample


# ---------------------------------------------------------------------------------------------- data


def _data_config(cfg: FinetuneConfig, bundle):
    from ..data.dataset_config import folder_config, load_data_config

    d = cfg.data
    res = d.resolution or bundle.default_size
    step = d.bucket_reso_steps or (8 if res < 256 else 64)
    options = {"resolution": res, "enable_bucket": d.enable_bucket, "bucket_reso_steps": step,
               "min_bucket_reso": d.min_bucket_reso or max(step, res // 2),
               "max_bucket_reso": d.max_bucket_reso or res * 2, "batch_size": cfg.run.batch_size,
               "caption_extension": d.caption_extension, "require_captions": d.require_captions,
               "shuffle_caption": d.shuffle_caption,
               "keep_tokens": d.keep_tokens, "caption_dropout_rate": d.caption_dropout_rate,
               "flip_aug": d.flip_aug, "random_crop": d.random_crop}
    data = load_data_config(d.dataset) if d.dataset else folder_config(d.train_data_dir, **options)
    if cfg.method == "dreambooth" and cfg.dreambooth.instance_prompt:
        for ds in data.datasets:
            for sub in ds.subsets:
                if not sub.is_reg and not sub.class_tokens:
                    sub.class_tokens = cfg.dreambooth.instance_prompt
    return data


def _split(index, share: float, seed: int):
    """(training index, validation index or None): a seeded share of the non-regularisation images held out."""
    if share <= 0:
        return index, None
    candidates = [i for i, it in enumerate(index.items) if not index.subsets[it.subset].is_reg]
    k = max(1, round(share * len(candidates)))
    if k >= len(candidates):
        raise UserError(f"data.validation_split {share} leaves no training images ({len(candidates)} in all)",
                        field="data.validation_split")
    held = set(random.Random(f"{seed}:validation").sample(candidates, k))
    keep = lambda pred: dataclasses.replace(index, items=[it for i, it in enumerate(index.items) if pred(i)],  # noqa: E731
                                            _repeats=None)
    return keep(lambda i: i not in held), keep(lambda i: i in held)


class BucketBatches:
    """Batches of one bucket each, from every dataset of a `DatasetIndex`, in an order that is a pure function
    of (seed, global batch number): epoch e is all datasets' batches shuffled together with (seed, e)."""

    def __init__(self, task: "FinetuneTask", cfg: FinetuneConfig, world: int, rank: int):
        self.task, self.index = task, task.index
        self.seed, self.accum, self.world, self.rank = cfg.run.seed, cfg.run.grad_accum, world, rank
        self.items_per_step = cfg.run.batch_size * cfg.run.grad_accum * world
        self.per_epoch = len(self._epoch(0))
        self.summary = {"images": self.index.num_train_images, "reg images": self.index.num_reg_images,
                        "batches per epoch": self.per_epoch}

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> list[list[int]]:
        batches = [b for d in range(len(self.index.config.datasets)) for b in self.index.batches(d, self.seed, epoch)]
        random.Random(f"{self.seed}:datasets:{epoch}").shuffle(batches)
        return batches

    def _global(self, step: int, micro: int) -> int:
        return (step * self.accum + micro) * self.world + self.rank

    def epoch(self, step: int) -> int:
        return self._global(step, 0) // self.per_epoch

    def batch(self, step: int, micro: int) -> dict:
        g = self._global(step, micro)
        epoch, j = divmod(g, self.per_epoch)
        return self.task.make_batch(self._epoch(epoch)[j], epoch, g)

    def loader(self, start: int, end: int):
        return (self.batch(s, m) for s in range(start, end) for m in range(self.accum))


# ---------------------------------------------------------------------------------------------- the task


class FinetuneTask(Task):
    def __init__(self, cfg: FinetuneConfig, bundle=None):
        from ..data.dataset import build_index
        from ..models.loader import load_model

        self.cfg = cfg
        self.bundle = bundle or load_model(_base_model(cfg), vae=cfg.vae or None,
                                           prediction_type=cfg.noise.prediction_type or None)
        b = self.bundle
        if cfg.noise.prediction_type:
            b.prediction_type = cfg.noise.prediction_type
        self.alpha_bar = training_alphas(b.schedule).float()
        n = cfg.noise
        for key in ("max_timestep", "prior_max_timestep"):
            if getattr(n, key) > len(self.alpha_bar):
                raise UserError(f"config: noise.{key} ({getattr(n, key)}) is above the model's "
                                f"{len(self.alpha_bar)} training timesteps", field=f"noise.{key}")
        self.started = time.time()
        self.run_dir = Path(cfg.run.out)
        if cfg.prior_preservation:
            self.class_dir = ensure_class_images(cfg, b)
        data = _data_config(cfg, b)
        if cfg.prior_preservation:
            from ..data.dataset_config import SubsetConfig

            for ds in data.datasets:  # each class image's caption file holds its own prompt
                ds.subsets.append(SubsetConfig(image_dir=str(self.class_dir), is_reg=True,
                                               class_tokens=class_prompts(cfg.dreambooth)[0], caption_extension=".txt"))
        index = build_index(data)
        self.index, self.val_index = _split(index, cfg.data.validation_split, cfg.run.seed)
        trigger = cfg.textual_inversion.token if cfg.trains_embedding else None
        self.text = TrainingText(b, trigger, cfg.textual_inversion.num_vectors)
        if trigger:
            self._check_trigger_in_captions(trigger)
        seed_everything(cfg.run.seed)  # LoRA layers start from the global RNG
        self.vectors = self._freeze_and_mark()
        self.module = FinetuneModule(b, self.vectors, cfg.clip_skip)
        if cfg.gradient_checkpointing:
            b.unet.enable_gradient_checkpointing()
            if cfg.trains_text_encoder:
                for enc in b.text_encoders:
                    enc.gradient_checkpointing_enable()
        self._latent_keys = self._text_keys = None
        self.cache = None

    def _check_trigger_in_captions(self, token: str) -> None:
        used = sum(1 for it in self.index.items if any(s for s in self.text._tokens(it.caption)[1]))
        what = "textual inversion" if self.cfg.method == "textual_inversion" else "pivotal tuning"
        if not used:
            raise UserError(f"{what}: no caption contains the token {token!r}; put it in the captions "
                            f"(e.g. \"a photo of {token}\")", field="textual_inversion.token")
        log.info("%s: %d of %d captions contain %r", what, used, len(self.index.items), token)

    # ------------------------------------------------------------------ what trains

    def _freeze_and_mark(self) -> list[torch.Tensor] | None:
        cfg, b = self.cfg, self.bundle
        for net in (b.unet, b.vae, *b.text_encoders):
            net.requires_grad_(False)
        vectors = None
        if cfg.trains_embedding:
            vectors = init_token_vectors(b, cfg.textual_inversion)
        if cfg.method == "lora":
            add_lora(b, cfg.lora)
        elif cfg.method != "textual_inversion":
            b.unet.requires_grad_(True)
            if cfg.trains_text_encoder:
                for enc in b.text_encoders:
                    enc.requires_grad_(True)
        return vectors

    def param_groups(self, lr: float) -> list[dict]:
        """UNet (or all) at `lr`; the text encoders (a LoRA's text-encoder layers, or the whole encoders of a
        DreamBooth or full fine-tune) at their method's text_encoder_lr and the token vectors of a pivotal run at
        textual_inversion.lr, where those are set."""
        cfg = self.cfg
        te_lr = {"lora": cfg.lora.text_encoder_lr, "dreambooth": cfg.dreambooth.text_encoder_lr,
                 "full": cfg.text_encoder_lr}.get(cfg.method, 0.0)
        vec_lr = self.cfg.textual_inversion.lr if self.cfg.method != "textual_inversion" else 0.0
        unet, text, vectors = [], [], []
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("text_encoders.") and te_lr:
                text.append(p)
            elif name.startswith("vectors.") and vec_lr:
                vectors.append(p)
            else:
                unet.append(p)
        groups = [{"params": unet, "lr": lr}]
        groups += [{"params": ps, "lr": x} for ps, x in ((text, te_lr), (vectors, vec_lr)) if ps]
        return groups

    def after_step(self) -> None:
        """textual_inversion.max_norm: each trained vector longer than it is scaled back onto that sphere."""
        limit = self.cfg.textual_inversion.max_norm
        if self.vectors is None or not limit:
            return
        with torch.no_grad():
            for v in self.vectors:
                v.mul_((limit / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))

    def _trainable_names(self, module) -> list[str]:
        return [k for k, p in module.named_parameters() if p.requires_grad]

    def checkpoint_weights(self, module) -> dict[str, torch.Tensor]:
        names = set(self._trainable_names(module))
        return {k: v for k, v in module.state_dict().items() if k in names}

    def load_checkpoint_weights(self, module, weights: dict[str, torch.Tensor]) -> None:
        names = set(self._trainable_names(module))
        if set(weights) != names:
            raise UserError(f"the checkpoint holds other trained weights than this {self.cfg.method} run "
                            f"({len(weights)} tensors, this run trains {len(names)}): it was made by another "
                            "method or model", field="resume")
        current = module.state_dict()
        bad = [k for k, v in weights.items() if tuple(v.shape) != tuple(current[k].shape)]
        if bad:
            raise UserError(f"the checkpoint does not fit this model ({bad[0]}: shape differs): it was made for "
                            "another model", field="resume")
        module.load_state_dict(weights, strict=False)

    # ------------------------------------------------------------------ data and caches

    def setup(self, accelerator) -> None:
        self.device = accelerator.device
        b = self.bundle
        b.vae.to(self.device)
        for enc in b.text_encoders:
            enc.to(self.device)
        if self.cfg.data.cache_latents or self._can_cache_text():
            self._build_caches(accelerator)

    def batch_source(self, cfg, world: int, rank: int):
        return BucketBatches(self, cfg, world, rank)

    def _can_cache_text(self) -> bool:
        from ..data.cache import text_cache_conflicts

        cfg = self.cfg
        if not cfg.data.cache_text or cfg.trains_embedding or cfg.trains_text_encoder:
            return False
        conflicts = text_cache_conflicts(self.index)
        if conflicts:
            log.info("text-encoder outputs not cached: %s", "; ".join(conflicts))
        return not conflicts

    def _cache_root(self) -> Path:
        return Path(self.cfg.data.cache_dir) if self.cfg.data.cache_dir else self.run_dir.parent / "cache"

    def _build_caches(self, accelerator) -> None:
        from ..data.cache import FeatureCache, cache_latents, cache_text, latent_cache_conflicts, module_fingerprint

        b = self.bundle
        self.cache = FeatureCache(self._cache_root())
        indexes = [self.index] + ([self.val_index] if self.val_index is not None else [])
        if self.cfg.data.cache_latents:
            conflicts = latent_cache_conflicts(self.index)
            if conflicts:
                raise UserError("data.cache_latents needs fixed pixels: " + "; ".join(conflicts) +
                                " (turn those off or set data.cache_latents = false)", field="data.cache_latents")
            vae_id = module_fingerprint(b.vae)
            with accelerator.main_process_first():
                self._latent_keys = [cache_latents(ix, self.cache, self.encode_pixels, vae_id) for ix in indexes]
        if self._can_cache_text():
            enc_id = functools.reduce(lambda a, e: a + module_fingerprint(e)[:16], b.text_encoders, "")
            from ..data.dataset import process_caption

            captions = [[process_caption(it.caption, ix.subsets[it.subset], random.Random(0)) for it in ix.items]
                        for ix in indexes]
            with accelerator.main_process_first():
                self._text_keys = [cache_text(c, self.cache, self._encode_captions, enc_id,
                                              clip_skip=self.cfg.clip_skip) for c in captions]
        log.info("feature cache %s: %d hits, %d computed", self.cache.root, self.cache.hits, self.cache.misses)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents in the VAE's own precision (outside any autocast), exactly as the latent cache holds them."""
        b = self.bundle
        with torch.autocast(self.device.type, enabled=False):
            z = b.vae.encode(pixels.to(self.device, next(b.vae.parameters()).dtype)).latent_dist.mean
        return (z.float() - b.vae_shift_factor) * b.vae_scaling_factor

    @torch.no_grad()
    def _encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        t = self.text(captions)
        context, pooled = encode_text(self.bundle, self.bundle.text_encoders, t["ids"], None, None,
                                      self.cfg.clip_skip)
        out = {"context": context.float()}
        if pooled is not None:
            out["pooled"] = pooled.float()
        return out

    def make_batch(self, items: list[int], epoch: int, number: int, index=None, which: int = 0) -> dict:
        """The batch of `items` (one bucket): cached latents and text outputs where there are caches, else
        pixels and captions; draw `number` of the epoch fixes crops, flips and caption options."""
        from ..data.buckets import crop_info
        from ..data.dataset import collate_samples, load_sample, process_caption, sample_rng

        index = self.index if index is None else index
        size, seed = self.cfg.run.batch_size, self.cfg.run.seed
        if self._latent_keys is not None:  # no pixels needed (caching implies no random crop or flip)
            captions, crops = [], []
            for j, i in enumerate(items):
                item = index.items[i]
                rng = sample_rng(seed, epoch, number * size + j)
                captions.append(process_caption(item.caption, index.subsets[item.subset], rng))
                crops.append(crop_info(item.assignment))
            keys = self._latent_keys[which]
            batch = {"latents": torch.stack([self.cache.load(keys[i])["latents"] for i in items]),
                     "captions": captions, "crops": crops, "indices": list(items),
                     "time_ids": torch.tensor([c.time_ids() for c in crops], dtype=torch.float32)}
        else:
            batch = collate_samples([load_sample(index, i, seed=seed, epoch=epoch, position=number * size + j)
                                     for j, i in enumerate(items)])
        batch["reg"] = torch.tensor([index.subsets[index.items[i].subset].is_reg for i in items])
        if self._text_keys is not None:
            keys = self._text_keys[which]
            loaded = [self.cache.load(keys[i]) for i in items]
            batch["text"] = {k: torch.stack([x[k] for x in loaded]) for k in loaded[0]}
        return batch

    # ------------------------------------------------------------------ the loss

    def loss(self, model, batch: dict, generator: torch.Generator, *, sample_weights=None):
        x0 = batch["latents"].to(self.device) if "latents" in batch else self.encode_pixels(batch["pixels"])
        if "text" in batch:
            text = {k: v.to(self.device) for k, v in batch["text"].items()}
        elif not (self.cfg.trains_text_encoder or self.vectors is not None):
            with torch.autocast(self.device.type, enabled=False):  # frozen: as the text cache computes it
                text = self._encode_captions(batch["captions"])
        else:
            text = self.text(batch["captions"])
        if sample_weights is None and self.cfg.method in PRIOR_METHODS:
            w = self.cfg.dreambooth.prior_loss_weight
            sample_weights = torch.where(batch["reg"], torch.tensor(w), torch.tensor(1.0))
        time_ids = batch.get("time_ids")
        n = self.cfg.noise
        other = None
        if n.prior_max_timestep and n.prior_max_timestep != n.max_timestep and "reg" in batch:
            other = (batch["reg"], (n.min_timestep, n.prior_max_timestep))
        loss, per_sample = diffusion_loss(lambda noisy, t: model(noisy, t, text, time_ids), x0, self.alpha_bar,
                                          prediction_type=self.bundle.prediction_type,
                                          min_snr_gamma=n.min_snr_gamma, generator=generator,
                                          noise_offset=n.noise_offset, sample_weights=sample_weights,
                                          timesteps=(n.min_timestep, n.max_timestep), other_timesteps=other)
        return loss, {"mse": float(per_sample.mean())}

    def validation_loss(self, model) -> float | None:
        """Mean loss over up to VALIDATION_ITEMS held-out images, with the same noise and timesteps each time."""
        ix = self.val_index
        if ix is None:
            return None
        items = list(range(min(len(ix.items), VALIDATION_ITEMS)))
        total, count = 0.0, 0
        for start in range(0, len(items), self.cfg.run.batch_size):
            chunk = items[start:start + self.cfg.run.batch_size]
            by_bucket: dict = {}
            for i in chunk:
                by_bucket.setdefault(ix.items[i].bucket, []).append(i)
            for group in by_bucket.values():
                batch = self.make_batch(group, 0, start, index=ix, which=1)
                g = torch.Generator().manual_seed(10_000 + start)
                loss, _ = self.loss(model, batch, g, sample_weights=torch.ones(len(group)))
                total += float(loss) * len(group)
                count += len(group)
        return total / max(1, count)

    # ------------------------------------------------------------------ samples and export

    def _embeddings(self):
        """The embedding being trained, as the engine's embedding lookup (sample images); None without one."""
        if self.vectors is None:
            return None
        from ..models.embeddings import Embedding, EmbeddingsByName

        emb = Embedding(name=self.cfg.textual_inversion.token, vectors=self._vector_dict(device=None))
        return EmbeddingsByName([emb], self.bundle.tokenizers[0])

    @torch.no_grad()
    def generate(self, prompts, seeds, **overrides) -> list:
        from ..engine.generate import generate
        from ..params import make_params

        s = self.cfg.sample
        images = []
        self.module.eval()
        try:
            for prompt in prompts:
                for seed in seeds:
                    p = make_params(prompt=prompt, negative_prompt=s.negative_prompt, steps=s.steps, seed=seed,
                                    cfg_scale=s.cfg_scale, sampler_name=s.sampler, scheduler=s.scheduler,
                                    clip_skip=self.cfg.clip_skip, **overrides)
                    images += generate(self.bundle, p, embeddings=self._embeddings()).images
        finally:
            self.module.train()
        return images

    def samples(self, step: int, run_dir: Path) -> dict:
        s = self.cfg.sample
        if not s.prompts:
            return {}
        images = self.generate(list(s.prompts), list(s.seeds))
        grid = image_grid(images, columns=len(s.seeds), cell=max(96, self.bundle.default_size // 4),
                          labels=list(s.prompts))
        save_png(grid, run_dir / "samples" / f"step-{step:08d}.png")
        save_png(grid, run_dir / "samples.png")
        return {}

    def output_name(self) -> str:
        return self.cfg.output_name or self.run_dir.name

    def export(self, run_dir: Path) -> Path:
        cfg, b = self.cfg, self.bundle
        name = self.output_name()
        vectors = self._vector_dict() if self.vectors is not None else None
        if vectors is not None:  # A1111's embedding file, used by name; beside the model when trained with one
            from ..models.embeddings import save_embedding_a1111

            token = cfg.textual_inversion.token
            where = run_dir if cfg.method == "textual_inversion" else run_dir / "embeddings"
            embedding = save_embedding_a1111(where / f"{token}.safetensors", token, vectors, step=cfg.run.max_steps,
                                             sd_checkpoint=b.shorthash, sd_checkpoint_name=b.name)
            if cfg.method == "textual_inversion":
                return embedding
        if cfg.method == "lora":
            from ..models.lora_save import kohya_training_metadata, peft_lora_modules, save_kohya_lora

            modules = peft_lora_modules(b.unet, "unet")
            if cfg.lora.train_text_encoder:
                for k, enc in enumerate(b.text_encoders):
                    modules |= peft_lora_modules(enc, "text_encoder" if k == 0 else "text_encoder_2")
            bundled = {cfg.textual_inversion.token: vectors} if vectors is not None and cfg.lora.bundle_embedding \
                else None
            meta = kohya_training_metadata(b, modules, output_name=name, training_started_at=self.started,
                                           ss_learning_rate=cfg.optim.lr, ss_max_train_steps=cfg.run.max_steps,
                                           ss_num_epochs=self._epochs(), ss_resolution=self._resolution(),
                                           ss_clip_skip=cfg.clip_skip, ss_noise_offset=cfg.noise.noise_offset,
                                           ss_min_snr_gamma=cfg.noise.min_snr_gamma,
                                           ss_lr_scheduler=cfg.optim.decay, ss_seed=cfg.run.seed,
                                           **self.index.kohya_metadata())
            return save_kohya_lora(run_dir / f"{name}.safetensors", b, modules, metadata=meta, embeddings=bundled)
        from ..models.single_file import write_single_file
        from ..models.tiny import save_diffusers_folder

        folder = save_diffusers_folder(b, run_dir / name)
        if cfg.save_single_file:
            write_single_file(b, run_dir / f"{name}.safetensors")
        return folder

    def _vector_dict(self, device="cpu") -> dict[str, torch.Tensor]:
        """The trained token vectors keyed as embedding files hold them: "" or clip_l / clip_g (SDXL), float32, on
        `device` (None: where they train)."""
        from ..models.embeddings import embedding_keys

        return {k: v.detach().float().to(device or v.device) for k, v in zip(embedding_keys(self.bundle), self.vectors)}

    def _epochs(self) -> int:
        """kohya's ss_num_epochs: epochs the run's batches span (bucketed epochs end with short batches)."""
        per_epoch = sum(len(self.index.batches(d, self.cfg.run.seed, 0)) for d in range(len(self.index.config.datasets)))
        return -(-self.cfg.run.max_steps * self.cfg.run.grad_accum // max(1, per_epoch))

    def _resolution(self) -> str:
        r = self.cfg.data.resolution or self.bundle.default_size
        return f"({r}, {r})"


# ---------------------------------------------------------------------------------------------- methods


def _base_model(cfg: FinetuneConfig) -> str:
    if cfg.model:
        return cfg.model
    from ..models.registry import builtin_model_path

    path = builtin_model_path()
    if path is None:
        raise UserError("no base model given (model = ...) and the built-in model is not installed", field="model")
    return str(path)


def add_lora(bundle, opts) -> None:
    """Inject peft LoRA layers (rank, alpha, dropout) into the UNet's (and optionally the text encoders')
    target modules; only they train. A rank above a layer's smallest side is refused before training."""
    from peft import LoraConfig, inject_adapter_in_model

    nets = [("unet", bundle.unet, opts.unet_targets)]
    if opts.train_text_encoder:
        nets += [(f"text_encoder{'' if k == 0 else '_2'}", enc, opts.text_targets)
                 for k, enc in enumerate(bundle.text_encoders)]
    for label, net, targets in nets:
        matched = [(n, m) for n, m in net.named_modules()
                   if any(n == t or n.endswith("." + t) for t in targets)
                   and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        if not matched:
            raise UserError(f"lora: no {label} module matches the targets {', '.join(targets)}",
                            field="lora.unet_targets")
        for n, m in matched:
            side = min(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else \
                min(m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels)
            if opts.rank > side:
                raise UserError(f"lora.rank {opts.rank} is larger than the layer {label}.{n} allows ({side})",
                                field="lora.rank")
        config = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                            target_modules=sorted({n for n, _ in matched}), init_lora_weights=True)
        inject_adapter_in_model(config, net, adapter_name=PEFT_ADAPTER)
        for n, p in net.named_parameters():
            p.requires_grad_("lora_" in n)


def init_token_vectors(bundle, opts) -> list[torch.nn.Parameter]:
    """One trainable n x width tensor per text encoder, initialised from `init_word`'s token embeddings (vector
    i from token i * len / n, as A1111's create_embedding). A token already in the vocabulary is refused."""
    tok = bundle.tokenizers[0]
    if opts.token.lower() + "</w>" in tok.encoder:
        raise UserError(f"textual_inversion.token {opts.token!r} is already a word in the model's vocabulary; "
                        f"pick a new word (for example {opts.token}x or <{opts.token}>)", field="textual_inversion.token")
    init = tok.encode(opts.init_word) or tok.encode("*")
    out = []
    for enc in bundle.text_encoders:
        table = enc.get_input_embeddings().weight.detach()
        rows = [table[init[i * len(init) // opts.num_vectors]] for i in range(opts.num_vectors)]
        out.append(torch.nn.Parameter(torch.stack(rows).float().clone()))
    return out


def _generate_class_image(bundle, db, seed: int, res: int):
    from ..engine.generate import generate
    from ..params import make_params

    prompts = class_prompts(db)
    p = make_params(prompt=prompts[seed % len(prompts)], steps=db.class_steps, cfg_scale=db.class_cfg_scale,
                    seed=seed, width=res, height=res)
    return generate(bundle, p).images[0]


def ensure_class_images(cfg: FinetuneConfig, bundle) -> Path:
    """Prior-preservation images made by the base model from the class prompt(s) (image i from prompt i mod n),
    cached in the class folder (a manifest records model, prompts and settings; matching images already there are
    reused). Each image's caption file holds its prompt."""
    from tqdm import tqdm

    db = cfg.dreambooth
    folder = Path(db.class_dir) if db.class_dir else Path(cfg.run.out) / "class_images"
    folder.mkdir(parents=True, exist_ok=True)
    res = cfg.data.resolution or bundle.default_size
    prompts = class_prompts(db)
    recipe = {"model": bundle.shorthash or bundle.name,
              "prompt": prompts[0] if len(prompts) == 1 else list(prompts), "steps": db.class_steps,
              "cfg_scale": db.class_cfg_scale, "size": res}
    manifest = folder / "class_images.json"
    done = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if done.get("recipe") != recipe:
        done = {"recipe": recipe, "images": []}
    have = {n for n in done["images"] if (folder / n).is_file()}
    names = [f"class_{i:05d}.png" for i in range(db.num_class_images)]
    todo = [i for i, n in enumerate(names) if n not in have]
    for i in tqdm(todo, desc="class images", disable=not todo, unit="img"):
        image = _generate_class_image(bundle, db, i, res)
        with atomic_path(folder / names[i]) as tmp:
            image.save(tmp, format="PNG")
        atomic_write((folder / names[i]).with_suffix(".txt"), prompts[i % len(prompts)])
        have.add(names[i])
        manifest.write_text(json.dumps({"recipe": recipe, "images": sorted(have)}, indent=1))
    for stale in folder.glob("class_*.png"):
        if stale.name not in names:
            stale.unlink()
            stale.with_suffix(".txt").unlink(missing_ok=True)
    return folder


# ---------------------------------------------------------------------------------------------- entry


def check_resume(cfg: FinetuneConfig, resume) -> None:
    """Refuse, before loading anything big, to resume from a checkpoint of another method or base model."""
    from .checkpoint import find_checkpoint
    from .config import from_dict
    from ..tomlio import read_toml

    ckpt = find_checkpoint(resume)
    raw = read_toml(ckpt / "config.toml", "checkpoint config", "resume")
    if "method" not in raw:
        raise UserError(f"{ckpt} is not a fine-tune checkpoint (it was made by `sdstack train`)", field="resume")
    old = from_dict(FinetuneConfig, raw)
    if old.method != cfg.method:
        raise UserError(f"cannot resume a {cfg.method} run from a {old.method} checkpoint ({ckpt})", field="resume")
    if old.model != cfg.model:
        raise UserError(f"cannot resume: the checkpoint was trained on model {old.model or 'built-in'!r}, this run "
                        f"uses {cfg.model or 'built-in'!r}", field="resume")


def finetune(cfg: FinetuneConfig, *, resume=None, stop_at: int | None = None, bundle=None) -> dict:
    if resume is not None:
        check_resume(cfg, resume)
    task = FinetuneTask(cfg, bundle=bundle)
    return train(cfg, task, resume=resume, stop_at=stop_at)
