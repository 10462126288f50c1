"""Dataset configs: typed dataclasses that kohya-ss sd-scripts' dataset TOML maps onto, strictly.

    [general]                       # keys for every dataset and subset below
    shuffle_caption = true
    caption_extension = ".txt"
    [[datasets]]                    # bucket settings; keys for its subsets
    resolution = 1024               # or [width, height]
    enable_bucket = true
      [[datasets.subsets]]
      image_dir = "img/10_sks dog"
      num_repeats = 10
      class_tokens = "sks dog"

Unknown keys and wrong types are a `UserError` naming the key. kohya options sdstack does not implement are
accepted at their kohya default (so existing files load) and refused with a clear line otherwise. Relative
`image_dir` / `metadata_file` are relative to the TOML file. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..tomlio import read_toml

log = logging.getLogger(__name__)


@dataclass
class SubsetConfig:
    """One folder (or metadata file) of images; kohya `[[datasets.subsets]]` keys."""

    image_dir: str = ""
    metadata_file: str = ""  # metadata.jsonl (or kohya's fine-tune .json); default: image_dir/metadata.jsonl
    caption_column: str = "text"  # metadata.jsonl column holding the caption
    num_repeats: int = 1
    caption_extension: str = ".txt"
    class_tokens: str = ""  # caption for images without one (DreamBooth); "name" of an N_name folder
    is_reg: bool = False  # regularisation (prior preservation) images
    shuffle_caption: bool = False
    keep_tokens: int = 0  # leading comma-separated tags kept in place when shuffling
    keep_tokens_separator: str = ""  # alternative to keep_tokens: "fixed ||| shuffled ||| fixed suffix"
    caption_separator: str = ","
    caption_dropout_rate: float = 0.0  # probability of training on the empty caption
    caption_tag_dropout_rate: float = 0.0  # probability of dropping each non-kept tag
    caption_prefix: str = ""
    caption_suffix: str = ""
    flip_aug: bool = False
    random_crop: bool = False


@dataclass
class DatasetConfig:
    """kohya `[[datasets]]`: bucket settings shared by its subsets. `resolution` is a side or [width, height]."""

    subsets: list[SubsetConfig] = field(default_factory=list)
    resolution: int | list[int] = 512
    batch_size: int = 1
    enable_bucket: bool = False  # kohya's default: off = every image resized and cropped to `resolution`
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    require_captions: bool = False  # images without caption (and without class_tokens) are an error


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)


_SUBSET_KEYS = {f.name: f for f in dataclasses.fields(SubsetConfig)}
_DATASET_KEYS = {f.name: f for f in dataclasses.fields(DatasetConfig) if f.name != "subsets"}
# kohya options without an sdstack implementation, with the value that means "off" in kohya
_KOHYA_OFF = {"color_aug": False, "caption_dropout_every_n_epochs": 0, "token_warmup_step": 0, "token_warmup_min": 1,
              "enable_wildcard": False, "secondary_separator": None, "alpha_mask": False, "face_crop_aug_range": None,
              "cache_info": False, "validation_split": 0.0, "validation_seed": None, "custom_attributes": None,
              "resize_interpolation": None}


def _check_type(key: str, value, default, where: str):
    if key == "resolution":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value))
        want = "a number or [width, height]"
    elif isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise UserError(f"dataset config: {where}{key} must be {want}, got {value!r}", field=key)
    return value


def _known(table: dict, allowed: dict, where: str) -> dict:
    """`table` without kohya's unimplemented options at their "off" value; UserError for any other key."""
    out = {}
    for key, value in table.items():
        if key in allowed:
            out[key] = value
        elif key in _KOHYA_OFF and value in (_KOHYA_OFF[key], None, "", 0, False):
            log.info("dataset config: ignoring %s = %r (kohya option, off)", key, value)
        elif key in _KOHYA_OFF:
            raise UserError(f"dataset config: kohya option {key} = {value!r} in {where} is not supported by "
                            f"sdstack; remove it or set it to its default", field=key)
        else:
            raise UserError(f"dataset config: unknown key {key!r} in {where or 'the top level'}; valid: "
                            f"{', '.join(allowed)}", field=key)
    return out


def _default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _subset(inherited: dict, table: dict, where: str, base_dir: str | Path | None) -> SubsetConfig:
    merged = {k: v for k, v in inherited.items() if k in _SUBSET_KEYS} | _known(table, _SUBSET_KEYS, where)
    subset = SubsetConfig(**{k: _check_type(k, v, _SUBSET_KEYS[k].default, f"{where} ") for k, v in merged.items()})
    if not subset.image_dir and not subset.metadata_file:
        raise UserError(f"dataset config: {where} needs image_dir or metadata_file", field="image_dir")
    for key in ("image_dir", "metadata_file"):
        value = getattr(subset, key)
        if value and base_dir is not None and not Path(value).is_absolute():
            setattr(subset, key, str(Path(base_dir) / value))
    return subset


def data_config_from_dict(raw: dict, base_dir: str | Path | None = None) -> DataConfig:
    """Map a kohya-shaped dict ([general], [[datasets]], [[datasets.subsets]]) onto DataConfig, strictly."""
    _known(raw, {"general": 0, "datasets": 0}, "")
    general = _known(dict(raw.get("general") or {}), _SUBSET_KEYS | _DATASET_KEYS, "[general]")
    datasets = raw.get("datasets") or []
    if not isinstance(datasets, list) or not datasets:
        raise UserError("dataset config: no [[datasets]] table", field="datasets")
    out = DataConfig()
    for d, table in enumerate(datasets):
        where = f"[[datasets]] #{d + 1}"
        table = dict(table)
        subsets = table.pop("subsets", None)
        if not subsets:
            raise UserError(f"dataset config: {where} has no [[datasets.subsets]]", field="subsets")
        inherited = {**general, **_known(table, _SUBSET_KEYS | _DATASET_KEYS, where)}
        ds = DatasetConfig(**{k: _check_type(k, v, _default_of(_DATASET_KEYS[k]), f"{where} ")
                              for k, v in inherited.items() if k in _DATASET_KEYS})
        ds.subsets = [_subset(inherited, dict(sub), f"{where} subset #{s + 1}", base_dir)
                      for s, sub in enumerate(subsets)]
        out.datasets.append(ds)
    return out


def load_data_config(path: str | Path) -> DataConfig:
    """Read a kohya dataset TOML; relative image_dir / metadata_file are relative to the file's folder."""
    p = Path(path)
    raw = read_toml(p, "dataset config", "dataset_config")
    return data_config_from_dict(raw, base_dir=p.parent)


def parse_repeat_folder(name: str) -> tuple[int, str] | None:
    """kohya DreamBooth folder name `N_class tokens` -> (N, "class tokens"); None without a numeric prefix."""
    head, sep, rest = name.partition("_")
    if not sep or not head.isdigit():
        return None
    return int(head), rest


def folder_config(root: str | Path, **options) -> DataConfig:
    """One dataset from a folder: its `N_name` sub-folders as subsets (kohya `train_data_dir`), or the folder
    itself as one subset when it has none. `options` are DatasetConfig / SubsetConfig keys for all subsets."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}", field="data.path")
    raw_subsets = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        parsed = parse_repeat_folder(sub.name)
        if parsed is None:
            log.warning("ignoring folder %s: not named like N_name (N = repeats)", sub)
            continue
        raw_subsets.append({"image_dir": str(sub), "num_repeats": parsed[0], "class_tokens": parsed[1]})
    if not raw_subsets:
        raw_subsets = [{"image_dir": str(root)}]
    return data_config_from_dict({"general": options, "datasets": [{"subsets": raw_subsets}]})


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string


_ALWAYS = ("image_dir", "caption_extension", "resolution")  # kohya's defaults differ (".caption") or are absent


def _changed(obj, keys: dict) -> list[str]:
    return [f"{k} = {_toml_value(getattr(obj, k))}" for k, f in keys.items()
            if k in _ALWAYS or getattr(obj, k) != _default_of(f)]


def data_config_to_toml(cfg: DataConfig) -> str:
    """The config in kohya's TOML shape, non-default values only (a config that uses only kohya keys stays
    readable by sd-scripts); `load_data_config` reads it back to an equal DataConfig."""
    lines: list[str] = []
    for ds in cfg.datasets:
        lines += ["[[datasets]]", *_changed(ds, _DATASET_KEYS)]
        for sub in ds.subsets:
            lines += ["", "  [[datasets.subsets]]", *("  " + x for x in _changed(sub, _SUBSET_KEYS))]
        lines.append("")
    return "\n".join(lines)
