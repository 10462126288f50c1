"""Training data for both trainers: the shapes world or an image folder, as ([-1, 1] CHW tensor, caption) pairs,
and a deterministic batch plan: which items make up micro-batch `micro` of step `step` on process `rank` is a
pure function of (seed, step), so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from .config import DataConfig


class TrainingImages:
    """`ds[i]` -> (tensor 3xHxW in [-1, 1], caption); `len(ds)` is None for the endless shapes world."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        if cfg.source == "shapes":
            from ..data.shapes import ShapesWorld

            self.source = ShapesWorld(resolution=cfg.resolution, seed=cfg.world_seed, split=cfg.split,
                                      kind_weights=cfg.kind_weights or None, detail_share=cfg.detail_share,
                                      detail_widths=cfg.detail_widths)
            self.size = None
            self.summary = {"source": "shapes world", "split": cfg.split}
        else:
            from ..data.folder import ImageFolder

            self.source = ImageFolder(cfg.path, cfg.resolution, cfg.caption_ext)
            self.size = len(self.source)
            self.summary = {"source": cfg.path, **self.source.summary}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, caption = self.source[index][:2]
        return to_tensor(image), caption


def to_tensor(image) -> torch.Tensor:
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def to_pil(x: torch.Tensor):
    from PIL import Image

    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a)


@dataclass
class BatchPlan:
    """Item indices of each micro-batch. Endless data: consecutive indices; a folder: a fresh permutation per
    epoch (seeded by (seed, epoch)), the last partial epoch batch filled from the next epoch."""

    size: int | None
    batch_size: int
    grad_accum: int
    world: int
    rank: int
    seed: int

    @property
    def items_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def _flat(self, step: int, micro: int) -> int:
        return ((step * self.grad_accum + micro) * self.world + self.rank) * self.batch_size

    def epoch(self, step: int) -> int:
        return 0 if self.size is None else step * self.items_per_step // self.size

    def _perm(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
        return order

    def indices(self, step: int, micro: int) -> list[int]:
        start = self._flat(step, micro)
        if self.size is None:
            return list(range(start, start + self.batch_size))
        out, perms = [], {}
        for k in range(start, start + self.batch_size):
            e, i = divmod(k, self.size)
            if e not in perms:
                perms[e] = self._perm(e)
            out.append(perms[e][i])
        return out


class StepBatches(torch.utils.data.Dataset):
    """One element per (step, micro) from `start_step` on: the collated micro-batch (for a DataLoader)."""

    def __init__(self, data: TrainingImages, plan: BatchPlan, start_step: int, end_step: int, flip: bool = False):
        self.data, self.plan, self.start, self.end, self.flip = data, plan, start_step, end_step, flip

    def __len__(self) -> int:
        return (self.end - self.start) * self.plan.grad_accum

    def __getitem__(self, k: int):
        step, micro = divmod(k, self.plan.grad_accum)
        step += self.start
        idx = self.plan.indices(step, micro)
        pairs = [self.data[i] for i in idx]
        images = torch.stack([p[0] for p in pairs])
        if self.flip:
            rng = random.Random(f"{self.plan.seed}:flip:{step}:{micro}:{self.plan.rank}")
            mask = torch.tensor([rng.random() < 0.5 for _ in idx])
            images = torch.where(mask[:, None, None, None], images.flip(-1), images)
        return {"pixels": images, "captions": [p[1] for p in pairs], "step": step, "micro": micro}


def batch_loader(data: TrainingImages, plan: BatchPlan, start_step: int, end_step: int, workers: int = 0,
                 flip: bool = False):
    ds = StepBatches(data, plan, start_step, end_step, flip)
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                       persistent_workers=False, prefetch_factor=4 if workers else None)
