"""Text-encoder key maps: transformers CLIP text models <-> the two LDM layouts.

- "hf" (SD1 `cond_stage_model.transformer.`, SDXL `conditioner.embedders.0.transformer.`): the LDM file
  holds a transformers CLIPTextModel, so names are the HF checkpoint names (`text_model.*`), one to one.
- "openclip" (SD2 `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`): OpenCLIP's
  `transformer.resblocks.N` with a fused `attn.in_proj_weight/bias` [3C, ...] (split into q/k/v),
  `ln_1/ln_2`, `mlp.c_fc/c_proj`, `ln_final`, `token_embedding`, `positional_embedding`, and
  `text_projection` stored for `x @ P` (the transpose of CLIPTextModelWithProjection.text_projection.weight).

SD2: diffusers' text_encoder has 23 layers where OpenCLIP ViT-H has 24, because SD2 conditions on the
penultimate layer; the 24th resblock and `text_projection` are dropped on load, as diffusers does
(`SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`). Writing back (diffusers -> LDM) emits only the layers the model has
and no `text_projection`/`logit_scale`, exactly like diffusers' `convert_diffusers_to_original_stable_
diffusion.py`; A1111/ComfyUI load such files (non-strictly) and never use the missing last layer.

Diffusers-side names are the HF checkpoint layout (`text_model.*`). transformers 5 `CLIPTextModel` names
its own parameters without the `text_model.` prefix; `to_canonical` / `to_module_layout` convert.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .keymap import KeyMap, Rule, pairs

CANONICAL_PREFIX = "text_model."
HF_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
            "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")
OPENCLIP_LAYER = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("mlp.c_fc", "mlp.fc1"),
                  ("mlp.c_proj", "mlp.fc2"), ("ln_2", "layer_norm2"))
OPENCLIP_TOP = (("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
                ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                ("ln_final.weight", "text_model.final_layer_norm.weight"),
                ("ln_final.bias", "text_model.final_layer_norm.bias"))
OPENCLIP_LAYER_KEYS = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                       "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                       "mlp.c_proj.weight", "mlp.c_proj.bias")


def hf_keymap(cfg: Mapping, with_projection: bool = False) -> KeyMap:
    """CLIPTextModel(WithProjection) stored as itself: identity names under `text_model.`."""
    names = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for i in range(int(cfg["num_hidden_layers"])):
        names += [f"text_model.encoder.layers.{i}.{m}.{p}" for m in HF_LAYER for p in ("weight", "bias")]
    names += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    if with_projection:
        names.append("text_projection.weight")
    droppable = frozenset({"text_model.embeddings.position_ids"})  # an index buffer older files carry
    return KeyMap("text_encoder", tuple(Rule(n, (n,)) for n in names), droppable)


def openclip_keymap(cfg: Mapping, with_projection: bool) -> KeyMap:
    """OpenCLIP text tower <-> CLIPTextModel (SD2) or CLIPTextModelWithProjection (SDXL's second encoder)."""
    layers = int(cfg["num_hidden_layers"])
    rules = [Rule(a, (b,)) for a, b in OPENCLIP_TOP]
    for i in range(layers):
        ldm, dif = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        for p in ("weight", "bias"):
            qkv = tuple(f"{dif}.self_attn.{x}_proj.{p}" for x in "qkv")
            rules.append(Rule(f"{ldm}.attn.in_proj_{p}", qkv, "qkv"))
        rules += [r for a, b in OPENCLIP_LAYER for r in pairs(f"{ldm}.{a}", f"{dif}.{b}")]
    droppable = {"logit_scale"}
    if with_projection:
        rules.append(Rule("text_projection", ("text_projection.weight",), "transpose"))
    else:
        droppable |= {"text_projection"} | {f"transformer.resblocks.{layers}.{k}" for k in OPENCLIP_LAYER_KEYS}
    return KeyMap("text_encoder", tuple(rules), frozenset(droppable))


def to_canonical(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text-encoder state dict in either transformers naming -> HF checkpoint names (`text_model.*`).

    The `position_ids` index buffer (persistent in old transformers versions) is not a weight and is dropped.
    """
    out = {}
    for k, v in sd.items():
        if k.endswith("embeddings.position_ids"):
            continue
        top = k.startswith(CANONICAL_PREFIX) or k == "text_projection.weight"
        out[k if top else CANONICAL_PREFIX + k] = v
    return out


def to_module_layout(sd: Mapping[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical names -> the names `module.state_dict()` uses (transformers 5 drops `text_model.`)."""
    own = module.state_dict().keys()
    if any(k.startswith(CANONICAL_PREFIX) for k in own):
        return dict(sd)
    n = len(CANONICAL_PREFIX)
    return {(k[n:] if k.startswith(CANONICAL_PREFIX) else k): v for k, v in sd.items()}
