"""Write trained LoRAs as kohya-format `.safetensors`, the files AUTOMATIC1111, Forge and ComfyUI read.

Keys (facts from kohya-ss sd-scripts `networks/lora.py` and AUTOMATIC1111's Lora extension):
`<prefix>_<module path with '.' -> '_'>.lora_down.weight` (rank x in [x kh x kw]), `.lora_up.weight`
(out x rank [x 1 x 1]) and `.alpha` (a scalar; the update is up @ down * alpha / rank * weight). Prefixes:
`lora_unet`, `lora_te` (SD1/SD2) or `lora_te1` / `lora_te2` (SDXL). SD1/SD2 UNet paths are diffusers names;
SDXL paths are LDM names (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`), taken from the checkpoint key
map through `sdstack.models.lora.ldm_unet_module_names`. Text-encoder paths start with `text_model_`.

Embeddings trained with the LoRA (pivotal tuning) are added as `bundle_emb.<name>.string_to_param.*` (SD1/SD2) or
`bundle_emb.<name>.clip_l` / `.clip_g` (SDXL), the keys A1111's Lora extension reads.

Metadata: kohya's `ss_*` training keys (`ss_network_module` = "networks.lora", `ss_network_dim`,
`ss_network_alpha`, `ss_base_model_version`, `ss_output_name`, `ss_training_started_at`, ...), plus
`sshs_model_hash` / `sshs_legacy_hash`, the additional-networks hashes kohya precomputes from the file written
with only its `ss_*` metadata (sha256 of the bytes after the header; sha256[:8] of 64 KiB at 1 MiB).

    modules = peft_lora_modules(peft_unet, "unet") | peft_lora_modules(peft_te, "text_encoder")
    save_kohya_lora("out/my_style.safetensors", bundle, modules, metadata=kohya_training_metadata(bundle, ...))
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Mapping

import torch

from ..errors import UserError
from .lora import BUNDLE_PREFIX, ldm_unet_module_names
from ..fsio import atomic_write

NETWORK_MODULE = "networks.lora"
SDXL_BASE_VERSION = "sdxl_base_v1-0"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# (component, module path) -> (lora_down, lora_up, alpha)
LoraModules = Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]]


# ---------------------------------------------------------------------------------------------- names


def _component(bundle, comp: str) -> torch.nn.Module:
    if comp == "unet":
        return bundle.unet
    if comp not in COMPONENTS or comp == "text_encoder_2" and len(bundle.text_encoders) < 2:
        raise ValueError(f"unknown LoRA component {comp!r} for a {bundle.family} model")
    return bundle.text_encoders[0 if comp == "text_encoder" else 1]


def _te_prefix(bundle, comp: str) -> str:
    if len(bundle.text_encoders) == 1:
        return "lora_te"
    return "lora_te1" if comp == "text_encoder" else "lora_te2"


def _find_module(net: torch.nn.Module, path: str) -> tuple[str, torch.nn.Module]:
    """The module at `path`, tolerating files' `text_model.` level that transformers 5's CLIPTextModel lacks."""
    for candidate in (path, path.removeprefix("text_model."), "text_model." + path):
        try:
            return candidate, net.get_submodule(candidate)
        except AttributeError:
            continue
    raise ValueError(f"no module {path!r} in {type(net).__name__}")


class KohyaNamer:
    """kohya key prefix (`lora_unet_...`, `lora_te_...`) of each (component, module path) of one bundle."""

    def __init__(self, bundle):
        self.bundle = bundle
        self.ldm = ldm_unet_module_names(bundle.unet) if bundle.family == "sdxl" else {}

    def module(self, comp: str, path: str) -> torch.nn.Module:
        """The layer at `path`; inside a peft-wrapped model, the wrapped original layer."""
        module = _find_module(_component(self.bundle, comp), path)[1]
        return getattr(module, "base_layer", module)

    def name(self, comp: str, path: str) -> str:
        real, _ = _find_module(_component(self.bundle, comp), path)
        if comp == "unet":
            return "lora_unet_" + self.ldm.get(real, real).replace(".", "_")
        text_path = real if real.startswith("text_model.") else "text_model." + real
        return _te_prefix(self.bundle, comp) + "_" + text_path.replace(".", "_")


# ---------------------------------------------------------------------------------------------- tensors


def _shaped(module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor, where: str):
    """down/up reshaped as kohya stores them for this layer: 2-D for Linear, 4-D for Conv2d."""
    rank = down.shape[0]
    if up.shape[0] * rank != up.numel():
        raise ValueError(f"{where}: lora_up {tuple(up.shape)} does not have rank {rank}")
    w = module.weight
    if isinstance(module, torch.nn.Conv2d):
        down = down.reshape(rank, w.shape[1], *w.shape[2:]) if down.numel() == rank * w[0].numel() else down
        up = up.reshape(up.shape[0], rank, 1, 1)
    else:
        down, up = down.reshape(rank, -1), up.reshape(up.shape[0], rank)
    if down.shape[1:] != w.shape[1:] or up.shape[0] != w.shape[0]:
        raise ValueError(f"{where}: LoRA shapes {tuple(down.shape)}, {tuple(up.shape)} do not fit the layer's "
                         f"weight {tuple(w.shape)}")
    return down, up


def kohya_state_dict(bundle, modules: LoraModules, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya keys -> tensors for per-module (down, up, alpha) of this bundle's modules."""
    if not modules:
        raise ValueError("no LoRA modules to save")
    namer = KohyaNamer(bundle)
    out: dict[str, torch.Tensor] = {}
    for (comp, path), (down, up, alpha) in modules.items():
        name = namer.name(comp, path)
        if f"{name}.alpha" in out:
            raise ValueError(f"two LoRA modules map to {name} ({comp}.{path})")
        down, up = _shaped(namer.module(comp, path), down.detach(), up.detach(), f"{comp}.{path}")
        dt = dtype or down.dtype
        out[f"{name}.lora_down.weight"] = down.to("cpu", dt).contiguous()
        out[f"{name}.lora_up.weight"] = up.to("cpu", dt).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dt)
    return out


# ---------------------------------------------------------------------------------------------- metadata


def base_model_version(bundle) -> str:
    """kohya's `ss_base_model_version`: sd_v1, sd_v2 (+ `_v` for v-prediction) or sdxl_base_v1-0."""
    if bundle.family == "sdxl":
        return SDXL_BASE_VERSION
    version = "sd_v2" if bundle.family == "sd2" else "sd_v1"
    return version + ("_v" if bundle.prediction_type == "v_prediction" else "")


def _uniform(values: list[float]) -> str:
    return f"{float(values[0])}" if len(set(values)) == 1 else "Dynamic"  # kohya resize_lora's word


def kohya_training_metadata(bundle, modules: LoraModules, *, output_name: str,
                            training_started_at: float | None = None, **extra) -> dict[str, str]:
    """kohya's minimal ss_* keys for these modules; `extra` adds more (ss_ prefix added where missing, values
    stringified; dicts/lists as JSON, as kohya writes ss_tag_frequency or ss_dataset_dirs)."""
    ranks = [int(d.shape[0]) for d, _, _ in modules.values()]
    alphas = [float(a) for _, _, a in modules.values()]
    now = time.time()
    meta = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(ranks[0]) if len(set(ranks)) == 1 else "Dynamic",
        "ss_network_alpha": _uniform(alphas),
        "ss_base_model_version": base_model_version(bundle),
        "ss_v2": str(bundle.family == "sd2"),
        "ss_output_name": output_name,
        "ss_training_started_at": str(training_started_at if training_started_at is not None else now),
        "ss_training_finished_at": str(now),
        "ss_session_id": str(random.randint(0, 2**32)),
    }
    convs = [(int(d.shape[0]), float(a)) for d, _, a in modules.values() if d.dim() == 4 and d.shape[-1] > 1]
    if convs:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(convs[0][0]), "conv_alpha": str(convs[0][1])})
    if bundle.name:
        meta["ss_sd_model_name"] = str(bundle.name)
    if bundle.sha256:
        meta["ss_new_sd_model_hash"] = bundle.sha256
    for key, value in extra.items():
        key = key if key.startswith(("ss_", "sshs_", "modelspec.")) else "ss_" + key
        meta[key] = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) \
            else str(value)
    return meta


def addnet_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya precomputes them: from the file serialised with only the
    ss_* metadata, sha256 of the bytes after the header, and sha256[:8] of the 64 KiB at offset 1 MiB."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return hashlib.sha256(data[8 + n:]).hexdigest(), legacy


def bundled_embedding_tensors(name: str, vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA file's keys for an embedding trained with it, as AUTOMATIC1111's Lora extension reads them
    (`bundle_emb.<name>.string_to_param.*` for one text encoder, `bundle_emb.<name>.clip_l` / `.clip_g` for SDXL);
    `vectors` is keyed "" or clip_l / clip_g, each n x width."""
    if not name or any(c.isspace() or c == "." for c in name):
        raise ValueError(f"bundled embedding name must be one word without dots, got {name!r}")
    if set(vectors) == {""}:
        return {f"{BUNDLE_PREFIX}{name}.string_to_param.*": vectors[""].detach().float().cpu().contiguous()}
    if set(vectors) == {"clip_l", "clip_g"}:
        return {f"{BUNDLE_PREFIX}{name}.{k}": v.detach().float().cpu().contiguous() for k, v in vectors.items()}
    raise ValueError(f"embedding vectors must be keyed '' or clip_l/clip_g, got {sorted(vectors)}")


def save_kohya_lora(path: str | Path, bundle, modules: LoraModules, *, metadata: Mapping[str, str] | None = None,
                    dtype: torch.dtype | None = None,
                    embeddings: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> Path:
    """Write a kohya LoRA file atomically (temporary file + rename); adds the sshs_* hashes. Returns the path.
    `embeddings` ({name: vectors}) are embeddings trained with the LoRA, bundled into the file (pivotal tuning)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"LoRA output must be a .safetensors file, got {path.name}", field="output")
    from safetensors.torch import save

    tensors = kohya_state_dict(bundle, modules, dtype)
    for name, vectors in (embeddings or {}).items():
        tensors.update(bundled_embedding_tensors(name, vectors))
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.setdefault("ss_network_module", NETWORK_MODULE)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(tensors, meta)
    return atomic_write(path, save(tensors, metadata=meta))


# ---------------------------------------------------------------------------------------------- peft


def peft_lora_modules(model: torch.nn.Module, component: str, adapter: str = "default") -> dict:
    """{(component, module path): (down, up, alpha)} from a module holding peft LoRA layers (peft's
    `inject_adapter_in_model`, `get_peft_model`, or diffusers' `add_adapter`), one adapter.

    alpha = peft's scaling x rank, so kohya's alpha / rank reproduces peft's scale, also for `alpha_pattern`
    and rsLoRA (scaling = lora_alpha / sqrt(r)). DoRA adapters have no kohya LoRA form: UserError."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter):
            raise UserError(f"adapter {adapter!r} uses DoRA ({name}); it cannot be saved as a kohya LoRA")
        down = layer.lora_A[adapter].weight.detach()
        up = layer.lora_B[adapter].weight.detach()
        rank = int(layer.r[adapter])
        path = name.removeprefix("base_model.model.")
        out[(component, path)] = (down, up, float(layer.scaling[adapter]) * rank)
    if not out:
        raise UserError(f"no peft LoRA layers with adapter {adapter!r} in {type(model).__name__}")
    return out


def read_modules(bundle, tensors: Mapping[str, torch.Tensor]) -> dict:
    """The inverse of kohya_state_dict for this bundle (for round-trip checks): {(component, path): (down, up,
    alpha)} using sdstack's LoRA reader."""
    from .lora import LoraFile, match_lora

    lf = LoraFile(name="check", tensors=dict(tensors), metadata={}, hash_sha256="", addnet_hash="")
    m = match_lora(lf, bundle)
    if m.unmatched:
        raise ValueError(f"keys not matched: {m.unmatched[:5]}")
    return {(x.component, x.module): (x.down, x.up, x.alpha if x.alpha is not None else x.rank)
            for x in m.modules}

