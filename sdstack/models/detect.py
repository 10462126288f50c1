"""Which architecture a state dict holds: a declarative table of key signatures, probed in order.

Facts follow A1111 (`modules/sd_models_config.py guess_model_config_from_state_dict`) and diffusers
(`single_file_utils.CHECKPOINT_KEY_NAMES`): SDXL has OpenCLIP bigG at `conditioner.embedders.1`, the SDXL
refiner has only OpenCLIP at `conditioner.embedders.0`, SD2 has OpenCLIP ViT-H (width 1024) at
`cond_stage_model.model`, SD1 has CLIP ViT-L at `cond_stage_model.transformer`; the UNet's first conv has
9 input channels in inpainting models and 8 in instruct-pix2pix. Width checks (`family=True`) identify the
real architectures; sdstack's own files (tiny or custom sizes) are matched with them turned off.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from sdstack.errors import UserError

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SDXL_G = "conditioner.embedders.1.model.ln_final.weight"
REFINER_G = "conditioner.embedders.0.model.ln_final.weight"
SD2_QKV = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
SD1_TOK = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD1_TOK_OLD = "cond_stage_model.transformer.embeddings.token_embedding.weight"
UNET_CROSS_LDM = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
UNET_CROSS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@dataclass(frozen=True)
class Shape:
    """`shape[dim] == size` for `key`; `family` marks a full-size width check (skipped for custom sizes)."""

    key: str
    dim: int
    size: int
    family: bool = False


@dataclass(frozen=True)
class Signature:
    family: str | None
    variant: str
    layout: str
    requires: tuple[str, ...]
    shapes: tuple[Shape, ...] = ()
    supported: bool = True
    note: str = ""
    forbids: tuple[str, ...] = ()  # key prefixes that must be absent


def _in(n: int) -> Shape:
    return Shape(UNET_IN, 1, n)


_SDXL = (Shape(SDXL_G, 0, 1280, True),)
_SD2 = (Shape(SD2_QKV, 1, 1024, True),)
_SD1 = (Shape(SD1_TOK, 1, 768, True),)
_LDM_ONLY = "LDM UNet without text encoder or VAE; load it as part of a full checkpoint"
_OTHER_PARTS = ("cond_stage_model.", "conditioner.", "first_stage_model.")
_VAE_NOTE = "a VAE on its own; select it as the VAE of a checkpoint"
_UNET_NOTE = "a diffusers-format UNet on its own; load the whole diffusers folder instead"

# Priority order: the first signature whose keys are all present and whose shape checks hold wins.
SIGNATURES: tuple[Signature, ...] = (
    Signature("sdxl", "refiner", "ldm", (REFINER_G,), supported=False,
              note="SDXL refiner checkpoints are not supported yet; load an SDXL base checkpoint"),
    Signature("sdxl", "inpaint", "ldm", (SDXL_G, UNET_IN), _SDXL + (_in(9),), supported=False,
              note="SDXL inpainting checkpoints (9 input channels) are not supported yet"),
    Signature("sdxl", "base", "ldm", (SDXL_G, UNET_IN), _SDXL + (_in(4),)),
    Signature("sd2", "inpaint", "ldm", (SD2_QKV, UNET_IN), _SD2 + (_in(9),), supported=False,
              note="SD 2.x inpainting checkpoints (9 input channels) are not supported yet"),
    Signature("sd2", "base", "ldm", (SD2_QKV, UNET_IN), _SD2 + (_in(4),)),
    Signature("sd1", "inpaint", "ldm", (SD1_TOK, UNET_IN), _SD1 + (_in(9),), supported=False,
              note="SD 1.x inpainting checkpoints (9 input channels) are not supported yet"),
    Signature("sd1", "instruct-pix2pix", "ldm", (SD1_TOK, UNET_IN), _SD1 + (_in(8),), supported=False,
              note="instruct-pix2pix checkpoints (8 input channels) are not supported yet"),
    Signature("sd1", "base", "ldm", (SD1_TOK, UNET_IN), _SD1 + (_in(4),)),
    Signature("sd1", "base", "ldm", (SD1_TOK_OLD, UNET_IN), (Shape(SD1_TOK_OLD, 1, 768, True), _in(4))),
    Signature("sd2", "unet", "ldm", (UNET_CROSS_LDM,), (Shape(UNET_CROSS_LDM, 1, 1024, True),), False, _LDM_ONLY,
              _OTHER_PARTS),
    Signature("sd1", "unet", "ldm", (UNET_CROSS_LDM,), (Shape(UNET_CROSS_LDM, 1, 768, True),), False, _LDM_ONLY,
              _OTHER_PARTS),
    Signature(None, "vae", "ldm", ("encoder.conv_in.weight", "decoder.up.0.block.0.conv1.weight"),
              (), False, _VAE_NOTE),
    Signature(None, "vae", "ldm", ("first_stage_model.encoder.conv_in.weight",
                                   "first_stage_model.decoder.up.0.block.0.conv1.weight"), (), False, _VAE_NOTE,
              ("model.diffusion_model.", "cond_stage_model.", "conditioner.")),
    Signature(None, "vae", "diffusers", ("encoder.conv_in.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"),
              (), False, _VAE_NOTE),
    Signature("sdxl", "unet", "diffusers", ("conv_in.weight", "add_embedding.linear_1.weight"), (), False, _UNET_NOTE),
    Signature("sd2", "unet", "diffusers", ("conv_in.weight", UNET_CROSS), (Shape(UNET_CROSS, 1, 1024, True),), False,
              _UNET_NOTE),
    Signature("sd1", "unet", "diffusers", ("conv_in.weight", UNET_CROSS), (Shape(UNET_CROSS, 1, 768, True),), False,
              _UNET_NOTE),
)


@dataclass(frozen=True)
class DetectedModel:
    """What a state dict is. `prediction_type`/`zero_snr` come from marker keys when a file has them
    (SDXL v-pred fine-tunes carry `v_pred` and often `ztsnr`); None means "not marked"."""

    family: str | None
    variant: str
    layout: str
    supported: bool
    message: str
    in_channels: int | None = None
    prediction_type: str | None = None
    zero_snr: bool = False

    def require_supported(self) -> "DetectedModel":
        if not self.supported:
            raise UserError(f"unsupported model: {self.message}", field="model")
        return self


def _shapes(keys_and_shapes: Mapping) -> dict[str, tuple[int, ...]]:
    return {k: tuple(getattr(v, "shape", v)) for k, v in keys_and_shapes.items()}


def _matches(sig: Signature, shapes: Mapping[str, tuple[int, ...]], check_widths: bool) -> bool:
    if not all(k in shapes for k in sig.requires):
        return False
    if sig.forbids and any(k.startswith(sig.forbids) for k in shapes):
        return False
    for s in sig.shapes:
        if s.family and not check_widths:
            continue
        shape = shapes.get(s.key, ())
        if len(shape) <= s.dim or shape[s.dim] != s.size:
            return False
    return True


def detect_family(keys_and_shapes: Mapping, *, check_widths: bool = True) -> DetectedModel:
    """Key name -> shape (or tensor) mapping -> DetectedModel; raises UserError if nothing matches."""
    shapes = _shapes(keys_and_shapes)
    for sig in SIGNATURES:
        if _matches(sig, shapes, check_widths):
            in_shape = shapes.get(UNET_IN) or shapes.get("conv_in.weight")
            label = " ".join(x for x in (sig.family, sig.variant, f"({sig.layout} layout)") if x)
            return DetectedModel(
                family=sig.family, variant=sig.variant, layout=sig.layout, supported=sig.supported,
                message=sig.note or label, in_channels=in_shape[1] if in_shape and len(in_shape) > 1 else None,
                prediction_type="v_prediction" if "v_pred" in shapes else None, zero_snr="ztsnr" in shapes)
    sample = ", ".join(sorted(shapes)[:3])
    raise UserError(f"not a recognised Stable Diffusion checkpoint (SD 1.x, 2.x, XL): no known key layout "
                    f"matches ({len(shapes)} tensors, e.g. {sample})", field="model")


_PARAMETERIZATION = re.compile(r"""^\s*parameterization\s*:\s*["']?([A-Za-z0-9_]+)["']?\s*(?:#.*)?$""", re.M)


def prediction_type_from_yaml(text: str) -> str | None:
    """An LDM config's `parameterization: "v"` -> "v_prediction" ("eps" -> "epsilon"); None if absent."""
    m = _PARAMETERIZATION.search(text)
    if not m:
        return None
    return {"v": "v_prediction", "eps": "epsilon", "x0": "sample"}.get(m.group(1))


def yaml_prediction_type(checkpoint: str | Path) -> str | None:
    """Honour a `<checkpoint>.yaml` next to the file (A1111 convention), only for its parameterization."""
    path = Path(checkpoint).with_suffix(".yaml")
    return prediction_type_from_yaml(path.read_text(errors="replace")) if path.is_file() else None


@torch.no_grad()
def guess_v_prediction(unet: torch.nn.Module) -> bool:
    """A1111's test for SD 2.x (`is_using_v_parameterization_for_sd2`): with x and the text context filled
    with 0.5, t = 999, a v-prediction UNet's output minus x has mean < -1 (an eps UNet's is near 0).

    A1111 uses x of shape (1, 4, 8, 8) and context (1, 2, 1024); the context width here is the UNet's
    cross_attention_dim. Runs on the UNet's device and dtype. Not for UNets needing added conditioning (SDXL).
    """
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None):
        raise ValueError("guess_v_prediction needs a UNet without added conditioning (SD 1.x/2.x)")
    p = next(unet.parameters())
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, cfg.cross_attention_dim), 0.5, device=p.device, dtype=p.dtype)
    out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=context).sample
    return (out.float() - x.float()).mean().item() < -1
