"""Fine-tuning datasets in the layouts kohya-ss sd-scripts, OneTrainer and the diffusers examples read.

- a folder of images with same-name caption files (`cat.png` + `cat.txt`; extension configurable);
- kohya DreamBooth folders `N_name` (repeat N times, class tokens "name"): `folder_config(root)`;
- `metadata.jsonl` (HF imagefolder: `file_name` + a caption column, default `text`);
- kohya's fine-tune metadata `.json` (`{image_key: {"caption": ..., "tags": ...}}`) as a subset's metadata_file;
- a kohya TOML dataset config (`sdstack.data.dataset_config`, re-exported here): `load_data_config(path)`.

`build_index(cfg)` scans everything once, before any long work: it logs how many captions each subset has and
which images have none, skips unreadable images with one warning line each subset, and raises `UserError` for a
dataset with no images or (with `require_captions`) images without captions. The index is torch-free;
`load_sample(index, i, ...)` gives the [-1, 1] pixel tensor, the processed caption and the SDXL crop info.

Differences from kohya: the default caption extension is `.txt` (kohya: `.caption`), relative paths in a TOML
file are relative to that file, empty tags are dropped when tags are shuffled.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from .buckets import (BucketAssignment, CropInfo, Size, bucket_batches, check_bucket_settings, make_buckets,
                      parse_resolution, resize_and_crop, select_bucket, select_bucket_no_upscale)
from .dataset_config import (DataConfig, DatasetConfig, SubsetConfig, data_config_from_dict, data_config_to_toml,
                             folder_config, load_data_config, parse_repeat_folder)
from .folder import IMAGE_EXTENSIONS

__all__ = ["DataConfig", "DatasetConfig", "SubsetConfig", "data_config_from_dict", "data_config_to_toml",
           "folder_config",
           "load_data_config", "parse_repeat_folder", "Item", "SubsetReport", "DatasetIndex", "build_index",
           "process_caption", "sample_rng", "Sample", "load_image", "load_sample", "to_tensor", "collate_samples"]

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
_SHOWN = 5  # file names listed in one log line


# ---------------------------------------------------------------------------------------------------- index


@dataclass(frozen=True)
class Item:
    """One training image: where it is, its raw caption and which bucket it goes to."""

    path: Path
    caption: str
    caption_source: str  # "file", "metadata", "class_tokens" or "none"
    repeats: int
    dataset: int
    subset: int  # index into DatasetIndex.subsets
    assignment: BucketAssignment

    @property
    def bucket(self) -> Size:
        return self.assignment.bucket


@dataclass
class SubsetReport:
    """What scanning one subset found."""

    name: str
    caption_extension: str
    images: int = 0
    captioned: int = 0
    uncaptioned: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)
    too_small: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # metadata.jsonl entries whose file does not exist
    fallback: str = ""  # the class tokens used for images without a caption

    def lines(self) -> list[tuple[int, str]]:
        """(logging level, message) lines describing this subset."""
        out = [(logging.INFO, f"{self.name}: {self.images} images, {self.captioned} with captions")]
        fallback = f"; using class tokens {self.fallback!r}" if self.fallback else ""
        for what, paths, why in ((self.uncaptioned, "have no caption", f"no {self.caption_extension}{fallback}"),
                                 (self.unreadable, "are unreadable and skipped", "corrupt or not an image"),
                                 (self.too_small, "are smaller than one bucket step and skipped", "too small"),
                                 (self.missing, "listed in metadata do not exist", "missing")):
            if what:
                out.append((logging.WARNING, f"{self.name}: {len(what)} images {paths} ({why}): {_names(what)}"))
        return out


def _names(paths) -> str:
    names = [Path(p).name for p in paths]
    return ", ".join(names[:_SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


@dataclass
class DatasetIndex:
    config: DataConfig
    items: list[Item]
    subsets: list[SubsetConfig]
    reports: list[SubsetReport]
    buckets: list[list[Size]]  # per dataset: the predefined buckets (empty with bucket_no_upscale)
    _repeats: list[int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def _is_reg(self, it: Item) -> bool:
        return self.subsets[it.subset].is_reg

    @property
    def epoch_repeats(self) -> list[int]:
        """How often each item is drawn per epoch: `repeats` for training images; regularisation images are
        repeated to match the training-image count of their dataset (kohya's DreamBooth balancing)."""
        if self._repeats is None:
            self._repeats = [0 if self._is_reg(it) else it.repeats for it in self.items]
            for d in range(len(self.config.datasets)):
                _balance_reg(self, d, self._repeats)
        return self._repeats

    @property
    def num_train_images(self) -> int:
        """Images x repeats of the non-regularisation subsets (kohya's count)."""
        return sum(n for it, n in zip(self.items, self.epoch_repeats) if not self._is_reg(it))

    @property
    def num_reg_images(self) -> int:
        """Regularisation draws per epoch, after balancing."""
        return sum(n for it, n in zip(self.items, self.epoch_repeats) if self._is_reg(it))

    def repeated(self, dataset: int | None = None) -> list[int]:
        """Item indices, each listed as often as it is drawn per epoch (`epoch_repeats`): one epoch."""
        return [i for i, (it, n) in enumerate(zip(self.items, self.epoch_repeats)) if dataset in (None, it.dataset)
                for _ in range(n)]

    def batches(self, dataset: int, seed: int, epoch: int) -> list[list[int]]:
        """One epoch of `dataset` as batches of item indices sharing a bucket (deterministic in seed, epoch)."""
        order = self.repeated(dataset)
        size = self.config.datasets[dataset].batch_size
        chunks = bucket_batches([self.items[i].bucket for i in order], size, seed, epoch)
        return [[order[p] for p in chunk] for chunk in chunks]

    def batch_at(self, dataset: int, seed: int, k: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of the k-th batch of `dataset` counted over all epochs: a pure function of
        (seed, k), so a resumed run draws exactly the batches the uninterrupted run would have."""
        per_epoch = len(self.batches(dataset, seed, 0))  # the count depends only on the bucket sizes
        epoch, j = divmod(k, per_epoch)
        return epoch, self.batches(dataset, seed, epoch)[j]

    def kohya_metadata(self) -> dict[str, str]:
        """ss_* dataset metadata as kohya writes it into LoRA files (values are strings)."""
        dirs: dict[str, dict] = {}
        reg_dirs: dict[str, dict] = {}
        tags: dict[str, dict[str, int]] = {}
        for s, (sub, rep) in enumerate(zip(self.subsets, self.reports)):
            name = Path(sub.image_dir or sub.metadata_file).name
            (reg_dirs if sub.is_reg else dirs)[name] = {"n_repeats": sub.num_repeats, "img_count": rep.images}
            freq = tags.setdefault(name, {})
            for it in self.items:
                if it.subset == s:
                    for tag in (t.strip().lower() for t in it.caption.split(",")):
                        if tag:
                            freq[tag] = freq.get(tag, 0) + 1
        bucket_counts: dict[str, int] = {}
        for it, n in zip(self.items, self.epoch_repeats):
            key = f"{it.bucket[0]}x{it.bucket[1]}"
            bucket_counts[key] = bucket_counts.get(key, 0) + n
        return {"ss_num_train_images": str(self.num_train_images), "ss_num_reg_images": str(self.num_reg_images),
                "ss_dataset_dirs": json.dumps(dirs), "ss_reg_dataset_dirs": json.dumps(reg_dirs),
                "ss_tag_frequency": json.dumps(tags), "ss_bucket_info": json.dumps({"buckets": bucket_counts})}


def _balance_reg(index: DatasetIndex, dataset: int, repeats: list[int]) -> None:
    """kohya: regularisation images are taken in order with their own repeats until they reach the dataset's
    training-image count (later ones may get none), then given one more repeat each, round-robin, until they
    do. Fills `repeats` for the dataset's regularisation items in place."""
    reg = [i for i, it in enumerate(index.items) if it.dataset == dataset and index._is_reg(it)]
    target = sum(repeats[i] for i, it in enumerate(index.items) if it.dataset == dataset)
    if not reg or target == 0:
        return
    n, first = 0, True
    while n < target:
        for i in reg:
            step = index.items[i].repeats if first else 1
            repeats[i] += step
            n += step
            if n >= target:
                break
        first = False


def _image_size(path: Path) -> Size | None:
    """(w, h) of a fully decodable image, None for a corrupt or unreadable one."""
    try:
        with Image.open(path) as im:
            im.load()  # decodes everything: a truncated file fails here, not mid-training
            return im.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _read_metadata(path: Path, column: str) -> list[tuple[Path, str | None]]:
    """(image path, caption) per line of a metadata.jsonl; file_name relative to the file's folder."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row.get("file_name") or row.get("image_path") or row["image"]
        except (ValueError, KeyError, AttributeError):
            raise UserError(f"{path} line {n}: not a JSON object with a file_name", field="metadata_file") from None
        caption = row.get(column, row.get("caption"))
        out.append((path.parent / str(name), None if caption is None else str(caption)))
    return out


def _read_kohya_json(path: Path, image_dir: str) -> list[tuple[Path, str | None]]:
    """kohya fine-tune metadata: {image key: {"caption": ..., "tags": ...}}; caption + ", " + tags (kohya);
    keys are paths, or names in image_dir with or without an image extension."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [(str(k), dict(v)) for k, v in data.items()]
    except (ValueError, TypeError, AttributeError):
        raise UserError(f"{path}: not a kohya metadata JSON object", field="metadata_file") from None
    out = []
    for key, meta in entries:
        p = Path(image_dir) / key if image_dir else Path(key)
        if not p.is_file():
            p = next((p.with_name(p.name + e) for e in IMAGE_EXTENSIONS if p.with_name(p.name + e).is_file()), p)
        parts = [str(meta[k]).strip() for k in ("caption", "tags") if meta.get(k)]
        out.append((p, ", ".join(parts) if parts else None))
    return out


def _subset_sources(sub: SubsetConfig) -> tuple[list[tuple[Path, str | None]], str]:
    """(image path, caption from metadata or None) pairs and the subset's display name."""
    meta = Path(sub.metadata_file) if sub.metadata_file else None
    if meta is None and sub.image_dir and (Path(sub.image_dir) / METADATA_FILE).is_file():
        meta = Path(sub.image_dir) / METADATA_FILE
    if meta is not None:
        if not meta.is_file():
            raise UserError(f"metadata file not found: {meta}", field="metadata_file")
        if meta.suffix.lower() == ".json":
            return _read_kohya_json(meta, sub.image_dir), str(meta)
        return _read_metadata(meta, sub.caption_column), str(meta)
    root = Path(sub.image_dir)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}", field="image_dir")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [(p, None) for p in files], str(root)


def _caption_for(path: Path, meta_caption: str | None, sub: SubsetConfig) -> tuple[str, str]:
    if meta_caption is not None:
        return meta_caption.strip(), "metadata"
    ext = sub.caption_extension
    cap = path.with_suffix(ext if ext.startswith(".") else "." + ext)  # "txt" means ".txt"
    if cap.is_file():
        text = cap.read_text(encoding="utf-8", errors="replace").strip()
        return text.splitlines()[0].strip() if text else "", "file"  # kohya: first line
    if sub.class_tokens:
        return sub.class_tokens, "class_tokens"
    return "", "none"


def _assign(size: Size, ds: DatasetConfig, buckets: list[Size]) -> BucketAssignment:
    if ds.enable_bucket and ds.bucket_no_upscale:
        w, h = check_bucket_settings(ds.resolution, ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps)
        return select_bucket_no_upscale(size[0], size[1], w * h, ds.bucket_reso_steps)
    return select_bucket(size[0], size[1], buckets)


def _dataset_buckets(ds: DatasetConfig) -> list[Size]:
    if not ds.enable_bucket:  # one bucket: the resolution itself
        return [parse_resolution(ds.resolution)]
    if ds.bucket_no_upscale:
        check_bucket_settings(ds.resolution, ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps)
        return []
    return make_buckets(ds.resolution, ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps)


def _scan_subset(sub: SubsetConfig, ds: DatasetConfig, d: int, s: int, buckets: list[Size]):
    if sub.num_repeats < 1:
        raise UserError(f"num_repeats must be at least 1 in {sub.image_dir or sub.metadata_file}",
                        field="num_repeats")
    sources, name = _subset_sources(sub)
    report = SubsetReport(name=name, caption_extension=sub.caption_extension, fallback=sub.class_tokens)
    items = []
    for path, meta_caption in sources:
        if not path.is_file():
            report.missing.append(str(path))
            continue
        size = _image_size(path)
        if size is None:
            report.unreadable.append(path)
            continue
        try:
            assignment = _assign(size, ds, buckets)
        except ValueError:
            report.too_small.append(path)
            continue
        caption, source = _caption_for(path, meta_caption, sub)
        report.images += 1
        if source in ("file", "metadata"):
            report.captioned += 1
        else:
            report.uncaptioned.append(path)
        items.append(Item(path, caption, source, sub.num_repeats, d, s, assignment))
    return items, report


def build_index(cfg: DataConfig) -> DatasetIndex:
    """Scan every subset once; log found/missing captions and skipped files; UserError on fatal problems."""
    if not cfg.datasets:
        raise UserError("dataset config: no datasets", field="datasets")
    items, subsets, reports, all_buckets = [], [], [], []
    for d, ds in enumerate(cfg.datasets):
        buckets = _dataset_buckets(ds)
        all_buckets.append(buckets)
        for sub in ds.subsets:
            found, report = _scan_subset(sub, ds, d, len(subsets), buckets)
            items += found
            subsets.append(sub)
            reports.append(report)
    for report in reports:
        for level, line in report.lines():
            log.log(level, line)
    if not items:
        where = "; ".join(r.name for r in reports)
        raise UserError(f"no usable images in {where} ({', '.join(IMAGE_EXTENSIONS)})", field="image_dir")
    for d, ds in enumerate(cfg.datasets):
        missing = [it.path for it in items if it.dataset == d and it.caption_source == "none"]
        if ds.require_captions and missing:
            ext = ", ".join(sorted({subsets[it.subset].caption_extension for it in items if it.dataset == d}))
            raise UserError(f"{len(missing)} images have no caption ({ext}) and require_captions is on: "
                            f"{_names(missing)}", field="require_captions")
    return DatasetIndex(cfg, items, subsets, reports, all_buckets)


# ---------------------------------------------------------------------------------------------------- samples


def process_caption(caption: str, sub: SubsetConfig, rng: random.Random) -> str:
    """kohya's caption pipeline: prefix/suffix, caption dropout (-> ""), then, when shuffling, tag dropout or a
    keep separator is in use, split on `caption_separator`, keep the fixed tags, drop/shuffle the rest."""
    if sub.caption_prefix:
        caption = f"{sub.caption_prefix} {caption}"
    if sub.caption_suffix:
        caption = f"{caption} {sub.caption_suffix}"
    if sub.caption_dropout_rate > 0 and rng.random() < sub.caption_dropout_rate:
        return ""
    keep_sep = sub.keep_tokens_separator
    if not (sub.shuffle_caption or sub.caption_tag_dropout_rate > 0 or (keep_sep and keep_sep in caption)):
        return caption

    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(sub.caption_separator) if t.strip()]

    suffix: list[str] = []
    if keep_sep and keep_sep in caption:
        fixed_text, flex_text = caption.split(keep_sep, 1)
        if keep_sep in flex_text:
            flex_text, suffix_text = flex_text.split(keep_sep, 1)
            suffix = tags(suffix_text)
        fixed, flex = tags(fixed_text), tags(flex_text)
    else:
        all_tags = tags(caption)
        fixed, flex = all_tags[:sub.keep_tokens], all_tags[sub.keep_tokens:]
    if sub.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= sub.caption_tag_dropout_rate]
    if sub.shuffle_caption:
        rng.shuffle(flex)
    return ", ".join(fixed + flex + suffix)


def sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The random stream for one draw of one item: `position` is its place in the epoch (`repeated()`)."""
    return random.Random(f"{seed}:{epoch}:{position}")


@dataclass
class Sample:
    pixels: object  # torch.Tensor 3 x H x W in [-1, 1] (H, W = the bucket)
    caption: str
    crop: CropInfo
    index: int


def load_image(index: DatasetIndex, i: int, rng: random.Random | None = None):
    """The item's image resized and cropped into its bucket (PIL RGB) and its CropInfo; random crop/flip are
    drawn from `rng` when the subset enables them (no rng: centred, unflipped, as for latent caching)."""
    item = index.items[i]
    sub = index.subsets[item.subset]
    flip = bool(rng is not None and sub.flip_aug and rng.random() < 0.5)
    random_crop = rng is not None and sub.random_crop
    try:
        with Image.open(item.path) as im:
            return resize_and_crop(im, item.assignment, random_crop=random_crop, flip=flip, rng=rng)
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {item.path}: {e}", field="image_dir") from None


def to_tensor(image: Image.Image):
    """PIL RGB -> float32 tensor 3 x H x W in [-1, 1]."""
    import numpy as np
    import torch

    a = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def load_sample(index: DatasetIndex, i: int, *, seed: int = 0, epoch: int = 0, position: int | None = None) -> Sample:
    """Pixels, processed caption and crop info for item `i`, deterministic in (seed, epoch, position).

    `position` tells apart the draws of one item within an epoch (it appears `repeats` times): any number
    unique to the draw, e.g. batch number * batch size + slot; default: the item index."""
    rng = sample_rng(seed, epoch, i if position is None else position)
    image, crop = load_image(index, i, rng)
    item = index.items[i]
    caption = process_caption(item.caption, index.subsets[item.subset], rng)
    return Sample(pixels=to_tensor(image), caption=caption, crop=crop, index=i)


def collate_samples(samples: list[Sample]) -> dict:
    """A batch (one bucket): pixels B x 3 x H x W, captions, SDXL time ids B x 6 (float), item indices."""
    import torch

    return {"pixels": torch.stack([s.pixels for s in samples]), "captions": [s.caption for s in samples],
            "time_ids": torch.tensor([s.crop.time_ids() for s in samples], dtype=torch.float32),
            "crops": [s.crop for s in samples], "indices": [s.index for s in samples]}
