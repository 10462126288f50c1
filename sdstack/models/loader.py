"""`load_model(path)`: diffusers folders and single-file LDM checkpoints (SD 1.x, 2.x, SDXL), offline.

Networks are diffusers/transformers classes built from configs (shipped in the package for real checkpoints,
carried in the file for sdstack's own) on the meta device, then filled strictly from the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from .bundle import ModelBundle
from .hashing import HashCache, tree_sha256
from .io import read_state_dict
from .tokenizer import VOCAB_SIZE, ClipTokenizer

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _empty(build):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def _fill(module: torch.nn.Module, sd: dict, label: str) -> torch.nn.Module:
    from .convert import load_into
    from .single_file import prepare_weights

    load_into(module, prepare_weights(sd, torch.float32), label, assign=True)
    return module


def build_unet(config: dict, sd: dict) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return _fill(_empty(lambda: UNet2DConditionModel.from_config(config)), sd, "unet")


def build_vae(config: dict, sd: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return _fill(_empty(lambda: AutoencoderKL.from_config(config)), sd, "vae")


def build_text_encoder(config: dict, sd: dict, with_projection: bool) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"})
    return _fill(_empty(lambda: cls(cfg)), sd, f"text encoder ({cls.__name__})")


def _folder_tokenizers(root: Path, family: str, encoders) -> list[ClipTokenizer]:
    """CLIP's own vocabulary for every text encoder with its 49408 tokens; the folder's tokenizer for one with
    another count (a trimmed vocabulary, as the built-in model's)."""
    out = _tokenizers(family)
    for i, (enc, name) in enumerate(zip(encoders, ["tokenizer", "tokenizer_2"])):
        rows = enc.get_input_embeddings().weight.shape[0]
        if rows == VOCAB_SIZE:
            continue
        try:
            tok = ClipTokenizer.from_pretrained(root / name)
        except ValueError as e:
            raise UserError(f"{root}: the text encoder has {rows} tokens, not CLIP's {VOCAB_SIZE}, so its own "
                            f"vocabulary is needed: {e}") from None
        if tok.vocab_size != rows:
            raise UserError(f"{root / name}: {tok.vocab_size} tokens, but the text encoder has {rows}")
        out[i] = tok
    return out


def _tokenizers(family: str) -> list[ClipTokenizer]:
    if family == "sd1":
        return [ClipTokenizer(pad_token_id=49407)]
    if family == "sd2":
        return [ClipTokenizer(pad_token_id=0)]
    return [ClipTokenizer(pad_token_id=49407), ClipTokenizer(pad_token_id=0)]


def _finish(bundle: ModelBundle, dtype: torch.dtype, device: str | torch.device) -> ModelBundle:
    for m in [bundle.unet, bundle.vae, *bundle.text_encoders]:
        p = next(m.parameters())
        if p.dtype != dtype or p.device != torch.device(device):
            m.to(device=device, dtype=dtype)
        m.eval().requires_grad_(False)
    return bundle


def _component_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    plain = [f for f in files if ".fp16." not in f.name] or files
    if not plain:
        raise UserError(f"{folder}: no weight file (.safetensors or .bin)")
    sd: dict[str, torch.Tensor] = {}
    for f in plain:
        sd.update(read_state_dict(f)[0])
    return sd


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: unreadable config ({e})") from None


def _load_diffusers_folder(root: Path) -> ModelBundle:
    index = _read_json(root / "model_index.json")
    family = "sdxl" if "text_encoder_2" in index else None
    unet = build_unet(_read_json(root / "unet" / "config.json"), _component_weights(root / "unet"))
    vae = build_vae(_read_json(root / "vae" / "config.json"), _component_weights(root / "vae"))
    encoders = []
    for name in ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]:
        cfg = _read_json(root / name / "config.json")
        encoders.append(build_text_encoder(cfg, _component_weights(root / name), name == "text_encoder_2"))
    if family is None:
        family = "sd2" if encoders[0].config.hidden_act == "gelu" else "sd1"
    sched_file = root / "scheduler" / "scheduler_config.json"
    schedule = _read_json(sched_file) if sched_file.is_file() else {}
    return ModelBundle(family=family, unet=unet, vae=vae, text_encoders=encoders,
                       tokenizers=_folder_tokenizers(root, family, encoders),
                       prediction_type=schedule.get("prediction_type", "epsilon"), schedule=schedule)


def load_vae_file(path: str | Path, like: torch.nn.Module) -> torch.nn.Module:
    """A separate VAE (A1111 `models/VAE` file, LDM or diffusers keys) built like the model's own VAE."""
    from .convert import vae_to_diffusers

    sd, _ = read_state_dict(path)
    diffusers_named = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd)
    converted = sd if diffusers_named else vae_to_diffusers(sd, dict(like.config))
    vae = build_vae(dict(like.config), converted)
    p = next(like.parameters())
    return vae.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; a UserError (one line) for a name torch does not know or a GPU this machine
    lacks, before anything is loaded."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N", field="device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {str(device)!r}: no CUDA GPU is available to this torch build", field="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA GPU(s) here",
                            field="device")
    elif dev.type != "cpu":
        raise UserError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N", field="device")
    return dev


def load_model(path: str | Path, *, vae: str | Path | None = None, prediction_type: str | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               hash_cache: HashCache | None = None) -> ModelBundle:
    """Load a diffusers folder or a single-file checkpoint; `vae` replaces the model's VAE."""
    device = check_device(device)
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model not found: {p}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}",
                        field="prediction_type")
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise UserError(f"{p}: a model folder needs model_index.json (diffusers layout)")
        bundle = _load_diffusers_folder(p)
        bundle.sha256 = tree_sha256(p)
        bundle.name = p.name
    else:
        from .single_file import load_single_file

        bundle = load_single_file(p)
        bundle.sha256 = (hash_cache or HashCache(None)).sha256(p)
        bundle.name = p.stem
    bundle.path = p
    if prediction_type:
        bundle.prediction_type = prediction_type
    bundle.schedule.setdefault("num_train_timesteps", 1000)
    if vae is not None:
        bundle.vae = load_vae_file(vae, bundle.vae)
        bundle.vae_name = Path(vae).name
        bundle.vae_sha256 = (hash_cache or HashCache(None)).sha256(vae)
    return _finish(bundle, dtype, device)
