"""LoRA files: reading, format detection, merging into a loaded model for one job, and the LoRA folder.

Formats read (facts from kohya-ss sd-scripts, AUTOMATIC1111's Lora extension and diffusers' loaders):
- kohya: `lora_unet_<module>`, `lora_te_<module>` (SD1/SD2), `lora_te1_`/`lora_te2_` (SDXL), where <module> is a
  module path with '.' -> '_'; tensors `.lora_down.weight`, `.lora_up.weight`, optional `.alpha` and `.lora_mid.weight`
  (LoCon CP decomposition). SD1/SD2 use diffusers UNet names; SDXL uses LDM names (`input_blocks_4_1_...`).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.`, `text_encoder_2.`; the older
  `.lora.down.weight` / `.lora_linear_layer.down.weight` and attention-processor `processor.to_q_lora.down.weight`.
Embeddings trained with the LoRA (pivotal tuning) ride in the file as `bundle_emb.<name>.<key>` (A1111's Lora
extension: `string_to_param.*`, `emb_params` or SDXL's `clip_l` / `clip_g`); a prompt that loads the LoRA can use
them by name, as a prompt uses an embedding from the embeddings folder.
Scale per module (A1111 `calc_scale`): alpha / rank, alpha defaulting to rank; a diffusers file's
`lora_adapter_metadata` (PEFT `lora_alpha`, `alpha_pattern`, `use_rslora`) supplies alpha when no `.alpha` key does.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..errors import UserError, unknown_name
from .hashing import HashCache
from .io import read_safetensors_metadata, read_state_dict

log = logging.getLogger(__name__)

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")

# (key suffix, role); checked in order, first match wins.
_ROLE_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # old attention-processor format
    (".alpha", "alpha"), (".dora_scale", "dora"),
)
BUNDLE_PREFIX = "bundle_emb."
_UNET_BLOCK_STARTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")
_OLD_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_PROCESSOR_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


# ---------------------------------------------------------------------------------------------- files and hashes


def _json_values(meta: dict) -> dict:
    """Metadata with string values that look like JSON objects decoded, as A1111's API shows them."""
    out = dict(meta)
    for k, v in out.items():
        if isinstance(v, str) and v.startswith("{"):
            with contextlib.suppress(ValueError):
                out[k] = json.loads(v)
    return out


@dataclass
class LoraFile:
    """A LoRA file read from disk. `addnet_hash` is what A1111 shows (first 12 hex) in `Lora hashes`."""

    name: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    hash_sha256: str
    addnet_hash: str
    path: Path | None = None

    @property
    def hash(self) -> str:
        """A1111's LoRA hash: `sshs_model_hash` from the metadata if present, else the addnet hash."""
        return str(self.metadata.get("sshs_model_hash") or self.addnet_hash)

    @property
    def shorthash(self) -> str:
        return self.hash[:12]

    @property
    def alias(self) -> str:
        return str(self.metadata.get("ss_output_name") or self.name)

    @functools.cached_property
    def bundled_embeddings(self) -> dict:
        """{name: Embedding} from the file's `bundle_emb.*` keys (read once per loaded file); UserError for one
        that is not an embedding."""
        from .embeddings import Embedding, vectors_from_data

        grouped: dict[str, dict] = {}
        for key, t in self.tensors.items():
            if key.startswith(BUNDLE_PREFIX):
                name, _, rest = key[len(BUNDLE_PREFIX):].partition(".")
                data = grouped.setdefault(name, {})
                if rest.startswith("string_to_param."):
                    data.setdefault("string_to_param", {})[rest[len("string_to_param."):]] = t
                else:
                    data[rest] = t
        where = f"LoRA {self.name}: {BUNDLE_PREFIX}"
        return {name: Embedding(name=name, vectors=vectors_from_data(data, where + name), hash=self.hash_sha256,
                                path=self.path) for name, data in grouped.items()}


def read_lora(path: str | Path, hash_cache: HashCache | None = None) -> LoraFile:
    """Read a LoRA file (.safetensors, or .pt/.ckpt through the weights-only unpickler) and hash it.

    The addnet hash covers the bytes after the safetensors header; for pickles A1111 uses the full sha256."""
    p = Path(path)
    tensors, meta = read_state_dict(p)
    cache = hash_cache or HashCache(None)
    full = cache.sha256(p)
    addnet = cache.sha256(p, "addnet") if p.suffix.lower() == ".safetensors" else full
    return LoraFile(name=p.stem, tensors=tensors, metadata=meta, hash_sha256=full, addnet_hash=addnet, path=p)


# ---------------------------------------------------------------------------------------------- key matching


@dataclass
class LoraModule:
    """One low-rank update: W[component.module] += multiplier * scale * up @ (mid) @ down."""

    component: str  # "unet", "text_encoder" or "text_encoder_2"
    module: str  # module path inside that component (diffusers / transformers names)
    key: str  # the key prefix in the file
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def fits(self, weight_shape: torch.Size) -> bool:
        """Whether up @ down has the target weight's number of elements (without computing it)."""
        n = self.up.shape[0] * self.down[0].numel()
        if self.mid is not None:
            n = self.up.shape[0] * self.down.shape[1] * self.mid[0, 0].numel()
        return n == torch.Size(weight_shape).numel()

    def delta(self, weight_shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        """up @ down (or the CP rebuild with mid) in float32 on `device`, shaped like the target weight; no scale."""
        if not self.fits(weight_shape):
            raise ValueError(f"LoRA {self.key}: update does not fit weight {tuple(weight_shape)}")
        up = self.up.to(device, torch.float32).reshape(self.up.shape[0], -1)
        down = self.down.to(device, torch.float32).reshape(self.down.shape[0], -1)
        if self.mid is not None:
            d = torch.einsum("nmkl,in,mj->ijkl", self.mid.to(device, torch.float32), up, down)
        else:
            d = up @ down
        return d.reshape(weight_shape)


@dataclass
class LoraMatch:
    """The modules of one LoRA file found in one model, and the keys that matched nothing."""

    name: str
    modules: list[LoraModule] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def ldm_unet_module_names(unet: torch.nn.Module) -> dict[str, str]:
    """{diffusers UNet module path: LDM (SAI/compvis) module path}, for kohya SDXL names like
    `input_blocks_4_1_transformer_blocks_0_attn1_to_q`; from the checkpoint key map. Empty for a UNet
    config the LDM map does not cover."""
    from .convert.unet import unet_keymap

    try:
        keymap = unet_keymap(dict(unet.config))
    except (ValueError, KeyError, AttributeError):
        return {}
    return {r.diffusers[0][: -len(".weight")]: r.ldm[: -len(".weight")]
            for r in keymap.rules if len(r.diffusers) == 1 and r.ldm.endswith(".weight")}


def _components(bundle) -> list[tuple[str, torch.nn.Module, tuple[str, ...]]]:
    """(component name, module, kohya prefixes) for each network a LoRA can patch."""
    out = [("unet", bundle.unet, ("lora_unet",))]
    tes = list(bundle.text_encoders)
    if len(tes) == 1:
        out.append(("text_encoder", tes[0], ("lora_te", "lora_te1")))  # diffusers' kohya writer uses lora_te1
    else:
        out.append(("text_encoder", tes[0], ("lora_te1",)))
        out.append(("text_encoder_2", tes[1], ("lora_te2",)))
    return out


class _Targets:
    """Patchable Linear/Conv2d modules of a bundle, looked up by dotted path or kohya flattened name."""

    def __init__(self, bundle):
        self.modules: dict[str, dict[str, torch.nn.Module]] = {}
        self.paths: dict[str, dict[str, str]] = {}  # component -> {name as files spell it: module path}
        self.flat: dict[str, tuple[str, str]] = {}  # "lora_unet_down_blocks_0_..." -> (component, module path)
        for comp, net, prefixes in _components(bundle):
            mods = {n: m for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
            self.modules[comp] = mods
            names = {n: n for n in mods}
            if comp == "unet":
                names.update({ldm: d for d, ldm in ldm_unet_module_names(net).items() if d in mods})
            else:
                names.update({a: n for a, n in _text_model_aliases(mods).items() if a not in names})
            self.paths[comp] = names
            for prefix in prefixes:
                for alias, path in names.items():
                    self.flat.setdefault(f"{prefix}_{alias.replace('.', '_')}", (comp, path))

    def resolve(self, prefix: str) -> tuple[str, str] | None:
        """(component, module path) for a key prefix (the key without its role suffix), or None."""
        if prefix.startswith("lora_"):
            return self.flat.get(prefix)
        comp, path = _split_dotted(prefix)
        if comp is None or comp not in self.modules:
            return None
        path = self.paths[comp].get(_normalise_old_processor(path, comp))
        return (comp, path) if path is not None else None


def _text_model_aliases(paths) -> dict[str, str]:
    """Files name CLIP layers `text_model.encoder...`; transformers 5's CLIPTextModel drops the `text_model.`
    level (CLIPTextModelWithProjection keeps it). Alias each path with and without it."""
    out = {}
    for n in paths:
        out[n[len("text_model."):] if n.startswith("text_model.") else "text_model." + n] = n
    return out


def _split_dotted(prefix: str) -> tuple[str | None, str]:
    """Component and module path of a diffusers/PEFT key prefix."""
    if prefix.startswith("base_model.model."):
        rest = prefix[len("base_model.model."):]
        return ("text_encoder" if rest.startswith("text_model.") else "unet"), rest
    for comp in ("unet", "text_encoder_2", "text_encoder"):
        if prefix.startswith(comp + "."):
            return comp, prefix[len(comp) + 1:]
    if prefix.startswith(_UNET_BLOCK_STARTS):  # pre-0.14 diffusers attn-procs files carry no component prefix
        return "unet", prefix
    return None, prefix


def _normalise_old_processor(path: str, comp: str) -> str:
    """`...attn1.processor.to_q` -> `...attn1.to_q`; text encoder `self_attn.to_q` -> `self_attn.q_proj`."""
    table = _OLD_PROCESSOR_UNET if comp == "unet" else _OLD_PROCESSOR_TE
    head, _, last = path.rpartition(".")
    if last not in table:
        return path
    if head.endswith(".processor"):
        head = head[: -len(".processor")]
    elif comp == "unet":
        return path
    return f"{head}.{table[last]}"


def _group_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """{key prefix: {role: tensor}} and the keys with no known LoRA role."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        if key.startswith(BUNDLE_PREFIX):  # an embedding trained with the LoRA, not a layer
            continue
        for suffix, role in _ROLE_SUFFIXES:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[role] = t
                break
        else:
            unknown.append(key)
    return groups, unknown


def _peft_alpha(metadata: dict[str, str], comp: str, module: str, rank: int) -> float | None:
    """Alpha for one module from a diffusers `lora_adapter_metadata` header (PEFT LoraConfig fields)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None
    alpha = cfg.get(f"{comp}.lora_alpha")
    for pattern, value in (cfg.get(f"{comp}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
            break
    if alpha is None:
        return None
    if cfg.get(f"{comp}.use_rslora"):
        return float(alpha) * rank**0.5  # rsLoRA scale alpha/sqrt(r), expressed as alpha' / r
    return float(alpha)


def match_lora(lora: LoraFile, bundle) -> LoraMatch:
    """Normalise a LoRA file to LoraModules addressed by this bundle's module paths.

    Keys that match no module of this model, groups without both up and down, and shape mismatches are
    listed in `unmatched` (the caller warns, as A1111 does)."""
    targets = _Targets(bundle)
    groups, unknown = _group_keys(lora.tensors)
    match = LoraMatch(name=lora.name, unmatched=list(unknown))
    for prefix, parts in groups.items():
        found = targets.resolve(prefix)
        if found is None or "down" not in parts or "up" not in parts or "dora" in parts:  # DoRA: not supported
            match.unmatched.extend(f"{prefix}{_suffix_of(role)}" for role in parts)
            continue
        comp, path = found
        mod = _make_module(lora, comp, path, prefix, parts)
        weight = targets.modules[comp][path].weight
        if not mod.fits(weight.shape):
            match.unmatched.append(f"{prefix} (shape does not fit {comp}.{path} {tuple(weight.shape)})")
            continue
        match.modules.append(mod)
    return match


def _suffix_of(role: str) -> str:
    return next(s for s, r in _ROLE_SUFFIXES if r == role)


def _make_module(lora: LoraFile, comp: str, path: str, prefix: str, parts: dict[str, torch.Tensor]) -> LoraModule:
    down, up = parts["down"], parts["up"]
    rank = int(down.shape[0])
    alpha = float(parts["alpha"].item()) if "alpha" in parts else _peft_alpha(lora.metadata, comp, path, rank)
    scale = alpha / rank if alpha else 1.0  # alpha None or 0 -> alpha = rank (kohya, A1111)
    return LoraModule(component=comp, module=path, key=prefix, down=down, up=up, alpha=alpha,
                      mid=parts.get("mid"), scale=scale)


def _warn_unmatched(match: LoraMatch) -> None:
    if not match.unmatched:
        return
    lyco = [k for k in match.unmatched if "hada_" in k or "lokr_" in k or k.endswith(".dora_scale")]
    kind = " (LoHa/LoKr/DoRA modules are not supported)" if lyco else ""
    shown = ", ".join(match.unmatched[:8]) + (" ..." if len(match.unmatched) > 8 else "")
    log.warning("LoRA %s: %d keys matched no layer of this model%s: %s", match.name, len(match.unmatched), kind,
                shown)


# ---------------------------------------------------------------------------------------------- applying


def _component_module(bundle, comp: str) -> torch.nn.Module:
    if comp == "unet":
        return bundle.unet
    return bundle.text_encoders[0 if comp == "text_encoder" else 1]


@contextlib.contextmanager
def apply_loras(bundle, loras: Sequence[tuple[LoraFile, float, float]]) -> Iterator[list[LoraMatch]]:
    """Merge LoRAs into the bundle's weights for the duration of a `with` block, then restore them bit-exactly.

    `loras` holds (file, te_weight, unet_weight); each module adds weight * alpha/rank * up @ down (A1111's
    merge). Only the patched weights are copied (to CPU) for the restore. A file none of whose keys fit this
    model raises UserError; partly matching files are applied and their stray keys logged as a warning."""
    matches = []
    for lora, _, _ in loras:
        m = match_lora(lora, bundle)
        if not m.modules and not lora.bundled_embeddings:
            raise UserError(f"LoRA {lora.name!r} ({lora.path or lora.name}) has no keys that match this "
                            f"{getattr(bundle, 'family', '')} model; is it for another model family?")
        _warn_unmatched(m)
        matches.append(m)
    backup: dict[tuple[str, str], tuple[torch.nn.Parameter, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for m, (_, te_w, unet_w) in zip(matches, loras):
                for mod in m.modules:
                    mult = float(unet_w if mod.component == "unet" else te_w)
                    if mult != 0.0:
                        _merge(bundle, mod, mult, backup)
        yield matches
    finally:
        with torch.no_grad():
            for param, original in backup.values():
                param.copy_(original)


def _merge(bundle, mod: LoraModule, mult: float, backup: dict) -> None:
    param = _component_module(bundle, mod.component).get_submodule(mod.module).weight
    key = (mod.component, mod.module)
    if key not in backup:
        backup[key] = (param, param.detach().to("cpu", copy=True))
    delta = mod.delta(param.shape, param.device)
    param.copy_((param.float() + delta * (mult * mod.scale)).to(param.dtype))


# ---------------------------------------------------------------------------------------------- the folder


@dataclass
class LoraEntry:
    name: str
    path: Path
    metadata: dict

    @property
    def alias(self) -> str:
        return str(self.metadata.get("ss_output_name") or self.name)

    def api_info(self) -> dict:
        """One item of A1111's GET /sdapi/v1/loras."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": self.metadata}


class LoraLibrary:
    """The LoRA folder (A1111 `models/Lora`): files found recursively, addressed by file stem (or alias)."""

    def __init__(self, directory: str | Path, hash_cache: HashCache | None = None):
        self.directory = Path(directory)
        self.hash_cache = hash_cache
        self._entries: dict[str, LoraEntry] | None = None
        self._loaded: dict[str, tuple[float, LoraFile]] = {}

    def refresh(self) -> None:
        entries: dict[str, LoraEntry] = {}
        if self.directory.is_dir():
            files = sorted(p for p in self.directory.rglob("*") if p.suffix.lower() in LORA_EXTENSIONS and p.is_file())
            for p in files:
                entries.setdefault(p.stem, LoraEntry(p.stem, p.resolve(), _entry_metadata(p)))
        self._entries = entries

    @property
    def entries(self) -> dict[str, LoraEntry]:
        if self._entries is None:
            self.refresh()
        return self._entries  # type: ignore[return-value]

    def names(self) -> list[str]:
        return list(self.entries)

    def api_list(self) -> list[dict]:
        return [e.api_info() for e in self.entries.values()]

    def find(self, name: str) -> LoraEntry:
        """The entry whose name (file stem) or, failing that, alias is `name`."""
        entry = self.entries.get(name) or next((e for e in self.entries.values() if e.alias == name), None)
        if entry is None:
            raise unknown_name("LoRA", name, self.names(), field="lora")
        return entry

    def get(self, name: str) -> Path:
        """The file of the LoRA called `name` (file stem, else alias); UserError listing valid names if none."""
        return self.find(name).path

    def load(self, name: str) -> LoraFile:
        """Read (and cache until the file changes) the LoRA called `name`."""
        entry = self.find(name)
        mtime = entry.path.stat().st_mtime
        cached = self._loaded.get(entry.name)
        if cached is None or cached[0] != mtime:
            lf = read_lora(entry.path, self.hash_cache)
            lf.name = entry.name
            self._loaded[entry.name] = (mtime, lf)
        return self._loaded[entry.name][1]


def _entry_metadata(p: Path) -> dict:
    if p.suffix.lower() != ".safetensors":
        return {}
    try:
        meta = _json_values(read_safetensors_metadata(p))
    except (UserError, OSError) as e:
        log.warning("LoRA %s: cannot read metadata: %s", p.name, e)
        return {}
    meta.pop("ssmd_cover_images", None)  # embedded cover images, too big for the API (A1111 drops them too)
    return meta
