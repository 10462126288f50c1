"""Single-file checkpoints (the A1111 / ComfyUI `.safetensors` layout) <-> sdstack components.

Real checkpoints get the shipped full-size configs of their detected family. Files sdstack writes carry
their own configs as JSON in the safetensors `__metadata__` under "sdstack_configs"
(`{"family", "unet", "vae", "text_encoders", "scheduler"}`), so tiny and custom-size models round-trip.
Everything is strict: unknown or missing keys and wrong shapes are errors that name them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from sdstack.errors import CheckpointKeyError

from .bundle import ModelBundle
from .io import read_state_dict
from .configs import load_configs
from .convert import LAYOUTS, diffusers_to_ldm, ldm_to_diffusers, load_into
from .convert.clip import to_canonical
from .convert.keymap import check_keys, check_shapes
from .detect import DetectedModel, detect_family, guess_v_prediction, yaml_prediction_type
from ..fsio import atomic_path

METADATA_KEY = "sdstack_configs"
VOCAB_KEY = "sdstack_vocabularies"  # a trimmed vocabulary's merges and pad token, per text encoder (null: CLIP's own)
CONFIG_PARTS = ("family", "unet", "vae", "text_encoders", "scheduler")


def _public(cfg: Mapping) -> dict:
    """A config dict without private bookkeeping keys (`_class_name`, `_diffusers_version`, ...)."""
    return {k: v for k, v in cfg.items() if not str(k).startswith("_")}


def _configs_from_metadata(metadata: Mapping[str, str] | None) -> dict | None:
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointKeyError(f"the file's {METADATA_KEY!r} metadata is not valid JSON: {e}") from None
    missing = [p for p in CONFIG_PARTS if p not in (cfg if isinstance(cfg, dict) else {})]
    if missing:
        raise CheckpointKeyError(f"the file's {METADATA_KEY!r} metadata lacks {', '.join(missing)}")
    return cfg


def _vocabularies(metadata: Mapping[str, str] | None, n: int) -> list:
    raw = (metadata or {}).get(VOCAB_KEY)
    if raw is None:
        return [None] * n
    try:
        vocabs = json.loads(raw)
        if not (isinstance(vocabs, list) and len(vocabs) == n and all(
                v is None or (isinstance(v.get("merges"), list) and isinstance(v.get("pad_token"), str)) for v in vocabs)):
            raise ValueError(f"expected a list of {n} entries, each null or with merges and pad_token")
    except (ValueError, AttributeError) as e:
        raise CheckpointKeyError(f"the file's {VOCAB_KEY!r} metadata is not readable: {e}") from None
    return vocabs


def instantiate(family: str, configs: Mapping, *, empty: bool = False) -> tuple:
    """(unet, vae, [text encoders]) built from configs; `empty` puts parameters on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ctx = init_empty_weights(include_buffers=False) if empty else torch.device("cpu")
    with ctx:
        unet = UNet2DConditionModel.from_config(_public(configs["unet"]))
        vae = AutoencoderKL.from_config(_public(configs["vae"]))
        encoders = []
        for (_, _, proj), cfg in zip(LAYOUTS[family]["text_encoders"], configs["text_encoders"]):
            cls = CLIPTextModelWithProjection if proj else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**_public(cfg))))
    return unet, vae, encoders


def check_components(family: str, configs: Mapping, components: Mapping) -> None:
    """Key sets and tensor shapes of converted components against models built (empty) from configs."""
    unet, vae, encoders = instantiate(family, configs, empty=True)
    pairs = [("unet", unet.state_dict(), components["unet"]), ("vae", vae.state_dict(), components["vae"])]
    pairs += [(f"text_encoders[{i}]", to_canonical(m.state_dict()), sd)
              for i, (m, sd) in enumerate(zip(encoders, components["text_encoders"]))]
    for label, own, sd in pairs:
        check_keys(label, own.keys(), sd.keys())
        check_shapes(label, {k: v.shape for k, v in own.items()}, sd)


def expected_ldm_shapes(family: str, configs: Mapping | None = None) -> dict[str, tuple[int, ...]]:
    """LDM key -> shape of every weight a single file of this family holds (shipped configs by default).

    Built on the meta device, so it costs no memory: a checklist of what a real checkpoint must contain.
    """
    configs = configs or load_configs(family)
    unet, vae, encoders = instantiate(family, configs, empty=True)
    components = {"unet": unet.state_dict(), "vae": vae.state_dict(),
                  "text_encoders": [e.state_dict() for e in encoders]}
    return {k: tuple(v.shape) for k, v in diffusers_to_ldm(components, family, configs).items()}


def read_single_file_components(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                                ) -> tuple[DetectedModel, dict, dict]:
    """LDM single-file state dict (+ safetensors metadata) -> (detected, configs, component state dicts).

    Raises UserError for files that are not a supported full checkpoint, CheckpointKeyError for key or
    shape mismatches.
    """
    own = _configs_from_metadata(metadata)
    detected = detect_family(state_dict, check_widths=own is None).require_supported()
    if own is not None and own["family"] != detected.family:
        raise CheckpointKeyError(f"the file says it is {own['family']!r} but its keys are {detected.family!r}")
    configs = own or load_configs(detected.family)
    components = ldm_to_diffusers(state_dict, detected.family, configs)
    check_components(detected.family, configs, components)
    return detected, configs, components


def bundle_configs(bundle: ModelBundle) -> dict:
    """The configs dict of a loaded bundle (what `write_single_file` stores in the metadata)."""
    return {"family": bundle.family, "unet": _public(bundle.unet.config), "vae": _public(bundle.vae.config),
            "text_encoders": [_public(e.config.to_dict()) for e in bundle.text_encoders],
            "scheduler": dict(bundle.schedule, prediction_type=bundle.prediction_type)}


def write_single_file(bundle: ModelBundle, path: str | Path) -> Path:
    """Write a bundle as an LDM-layout .safetensors with its configs in the metadata (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    configs = bundle_configs(bundle)
    components = {"unet": bundle.unet.state_dict(), "vae": bundle.vae.state_dict(),
                  "text_encoders": [e.state_dict() for e in bundle.text_encoders]}
    ldm = diffusers_to_ldm(components, bundle.family, configs)
    tensors = {k: v.detach().cpu().contiguous() for k, v in ldm.items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(configs, default=str)}
    if not all(t.is_standard for t in bundle.tokenizers):  # a single file has no tokenizer folder: keep it here
        metadata[VOCAB_KEY] = json.dumps([None if t.is_standard else {"merges": [" ".join(m) for m in t.merges()],
                                                                       "pad_token": t.pad_token}
                                          for t in bundle.tokenizers])
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def prepare_weights(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `dtype`; tensors that stay put are copied when their data is not 64-byte
    aligned (safetensors hands out views into the file at arbitrary offsets, and misaligned weights take
    different CPU kernels, so results would differ in the last bits from the same weights loaded elsewhere)."""
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.dtype != dtype:
            v = v.to(dtype)
        elif v.data_ptr() % 64:
            v = v.clone()
        out[k] = v
    return out


def _prediction_type(detected: DetectedModel, configs: Mapping, own: bool, unet, path: Path) -> str:
    """yaml next to the file > sdstack's own metadata > marker keys > A1111's SD2 forward test > config."""
    stored = configs["scheduler"].get("prediction_type") if own else None
    for candidate in (yaml_prediction_type(path), stored, detected.prediction_type):
        if candidate:
            return candidate
    if detected.family == "sd2":
        return "v_prediction" if guess_v_prediction(unet) else "epsilon"
    return configs["scheduler"].get("prediction_type", "epsilon")


def load_single_file(path: str | Path, *, dtype: torch.dtype = torch.float32) -> ModelBundle:
    """A single-file checkpoint -> ModelBundle (strict, offline, never executes code from the file)."""
    from .tokenizer import ClipTokenizer

    path = Path(path)
    state_dict, metadata = read_state_dict(path)
    detected, configs, components = read_single_file_components(state_dict, metadata)
    unet, vae, encoders = instantiate(detected.family, configs, empty=True)
    load_into(unet, prepare_weights(components["unet"], dtype), "unet", assign=True)
    load_into(vae, prepare_weights(components["vae"], dtype), "vae", assign=True)
    for i, (enc, sd) in enumerate(zip(encoders, components["text_encoders"])):
        load_into(enc, prepare_weights(sd, dtype), f"text_encoders[{i}]", assign=True)
    for m in (unet, vae, *encoders):
        m.eval().requires_grad_(False)
    own = METADATA_KEY in metadata
    prediction = _prediction_type(detected, configs, own, unet, path)
    schedule = _public(configs["scheduler"]) | {"prediction_type": prediction}
    if detected.zero_snr:
        schedule["rescale_betas_zero_snr"] = True
    pads = [0 if layout == "openclip" else 49407 for _, layout, _ in LAYOUTS[detected.family]["text_encoders"]]
    tokenizers = [ClipTokenizer(pad_token_id=p) for p in pads]
    for i, vocab in enumerate(_vocabularies(metadata, len(encoders))):
        if vocab is not None:
            tokenizers[i] = ClipTokenizer.from_merges([m.split(" ") for m in vocab["merges"]], vocab["pad_token"])
    for enc, tok in zip(encoders, tokenizers):
        rows = enc.get_input_embeddings().weight.shape[0]
        if rows != tok.vocab_size:
            raise CheckpointKeyError(f"{path.name}: the text encoder has {rows} tokens, its vocabulary "
                                     f"{tok.vocab_size} (a trimmed vocabulary must be in the {VOCAB_KEY!r} metadata)")
    return ModelBundle(family=detected.family, unet=unet, vae=vae, text_encoders=encoders,
                       tokenizers=tokenizers, prediction_type=prediction,
                       schedule=schedule, name=path.stem, path=path)
