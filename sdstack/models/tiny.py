"""Tiny random-weight models of each family, built in code (for tests and benchmarks).

Same block structure as the real architectures (so key maps, conditioning and the engine are exercised),
with a few thousand parameters per block so they run in milliseconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .bundle import ModelBundle
from .tokenizer import ClipTokenizer

SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "steps_offset": 1}

_UNET_COMMON = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8)


def _unet_config(family: str) -> dict:
    if family == "sd1":
        return dict(_UNET_COMMON, block_out_channels=(16, 16, 32), cross_attention_dim=32, attention_head_dim=8,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    if family == "sd2":
        return dict(_UNET_COMMON, block_out_channels=(16, 16, 32), cross_attention_dim=32,
                    attention_head_dim=(2, 2, 4), use_linear_projection=True,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    if family == "sdxl":
        return dict(_UNET_COMMON, block_out_channels=(16, 32, 32), cross_attention_dim=64,
                    attention_head_dim=(2, 2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1, 2),
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=6 * 8 + 32,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    raise ValueError(family)


def _vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64, scaling_factor=0.18215)


def _clip_config(act: str, with_projection: bool) -> dict:
    return dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=77, hidden_act=act, projection_dim=32, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=1 if not with_projection else 0)


def _randomize_norms(model: torch.nn.Module) -> None:
    """Give normalisation layers non-trivial affine parameters, as trained models have (default init makes
    every LayerNorm output exactly zero-mean, which hides bugs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)


def tiny_bundle(family: str = "sd1", seed: int = 0, prediction_type: str = "epsilon") -> ModelBundle:
    """A random-weight ModelBundle of the given family; same seed -> same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_unet_config(family))
    vae = AutoencoderKL(**_vae_config())
    if family == "sd1":
        encoders = [CLIPTextModel(CLIPTextConfig(**_clip_config("quick_gelu", False)))]
        tokenizers = [ClipTokenizer(pad_token_id=49407)]
    elif family == "sd2":
        encoders = [CLIPTextModel(CLIPTextConfig(**_clip_config("gelu", False)))]
        tokenizers = [ClipTokenizer(pad_token_id=0)]
    else:
        encoders = [CLIPTextModel(CLIPTextConfig(**_clip_config("quick_gelu", False))),
                    CLIPTextModelWithProjection(CLIPTextConfig(**_clip_config("gelu", True)))]
        tokenizers = [ClipTokenizer(pad_token_id=49407), ClipTokenizer(pad_token_id=0)]
    for m in [unet, vae, *encoders]:
        _randomize_norms(m)
        m.eval().requires_grad_(False)
    schedule = dict(SCHEDULE, prediction_type=prediction_type)
    return ModelBundle(family=family, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                       prediction_type=prediction_type, schedule=schedule, name=f"tiny-{family}")


def save_diffusers_folder(bundle: ModelBundle, path: str | Path) -> Path:
    """Write a bundle in the diffusers folder layout (model_index.json, unet/, vae/, text_encoder/, ...)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    xl = bundle.family == "sdxl"
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    index = {"_class_name": pipeline, "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    bundle.unet.save_pretrained(root / "unet")
    bundle.vae.save_pretrained(root / "vae")
    names = ["text_encoder", "text_encoder_2"] if xl else ["text_encoder"]
    tok_names = ["tokenizer", "tokenizer_2"] if xl else ["tokenizer"]
    for name, tname, enc, tok in zip(names, tok_names, bundle.text_encoders, bundle.tokenizers):
        enc.save_pretrained(root / name)
        tok.save_pretrained(root / tname)
        index[name] = ["transformers", type(enc).__name__]
        index[tname] = ["transformers", "CLIPTokenizer"]
    if not xl:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (root / "scheduler").mkdir(exist_ok=True)
    sched = dict(bundle.schedule, _class_name="EulerDiscreteScheduler", prediction_type=bundle.prediction_type)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def full_size_random_bundle(family: str = "sd1", seed: int = 0) -> ModelBundle:
    """Random weights in the real full-size architecture of a family (shipped configs), for slow tests and
    benchmarks: same shapes and FLOPs as a real checkpoint, nothing downloaded."""
    from .configs import load_configs
    from .single_file import instantiate

    torch.manual_seed(seed)
    configs = load_configs(family)
    unet, vae, encoders = instantiate(family, configs)
    for m in [unet, vae, *encoders]:
        m.eval().requires_grad_(False)
    pads = [49407] if family == "sd1" else [0] if family == "sd2" else [49407, 0]
    return ModelBundle(family=family, unet=unet, vae=vae, text_encoders=encoders,
                       tokenizers=[ClipTokenizer(pad_token_id=p) for p in pads],
                       prediction_type=configs["scheduler"].get("prediction_type", "epsilon"),
                       schedule=dict(configs["scheduler"]), name=f"{family}-random", sha256="0" * 64)
