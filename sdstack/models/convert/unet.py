"""UNet key map: diffusers `UNet2DConditionModel` <-> LDM `openaimodel.UNetModel` (`model.diffusion_model.*`).

Generated from the diffusers config: number of levels, layers per block (int or per level), which levels
carry cross-attention, transformer depth per level (SDXL), and the SDXL `label_emb` (diffusers
`add_embedding`). Layout facts:

- `input_blocks.0.0` is `conv_in`; then, level by level, one input block per resnet (`.0`, with its
  SpatialTransformer as `.1` on cross-attention levels) and one for the downsampler (`.0.op`) on every
  level but the last.
- `middle_block.0/1/2` = resnet, transformer, resnet.
- `output_blocks`: per up level, layers_per_block + 1 blocks (resnet `.0`, transformer `.1`); the last
  block of every up level but the last holds the upsampler as `.1.conv`, or `.2.conv` after a transformer.
- Inside a resnet LDM says in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection
  for norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut. Transformer internals have the same names in
  both layouts, and the same shapes: proj_in/proj_out are 1x1 convs in SD1 and linears when
  `use_linear_projection` (SD2, SDXL) in both, so no reshape is needed.
"""

from __future__ import annotations

from typing import Mapping

from .keymap import KeyMap, Rule, pairs

PREFIX = "model.diffusion_model."

TOP = (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
       ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"))
ADD_EMBEDDING = (("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2"))
RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
          ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
SHORTCUT = ("skip_connection", "conv_shortcut")
TRANSFORMER_OUTER = ("norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias")
TRANSFORMER_BLOCK = tuple(
    [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q.weight", "to_k.weight", "to_v.weight",
                                                     "to_out.0.weight", "to_out.0.bias")]
    + [f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
    + ["ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias"]
)

DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
# Config switches -> the values this map covers (others change the key layout); a missing key is fine.
SUPPORTED_VALUES = {"class_embed_type": (None,), "encoder_hid_dim_type": (None,), "time_cond_proj_dim": (None,),
                    "dual_cross_attention": (False,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
                    "attention_type": ("default",), "only_cross_attention": (False,),
                    "addition_embed_type": (None, "text_time")}


def _per_level(value, n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n or any(isinstance(v, (list, tuple)) for v in value):
        raise ValueError(f"unet config: {name} must be an int or one int per level, got {value!r}")
    return value


def _check_supported(cfg: Mapping) -> None:
    for key, allowed in SUPPORTED_VALUES.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"unet config: {key}={cfg[key]!r} is not supported by the LDM key map")
    for t in cfg["down_block_types"]:
        if t not in DOWN_TYPES:
            raise ValueError(f"unet config: down block type {t!r} is not supported")
    for t in cfg["up_block_types"]:
        if t not in UP_TYPES:
            raise ValueError(f"unet config: up block type {t!r} is not supported")


def _resnet(ldm: str, dif: str, shortcut: bool) -> list[Rule]:
    rules = [r for a, b in RESNET for r in pairs(f"{ldm}.{a}", f"{dif}.{b}")]
    return rules + (pairs(f"{ldm}.{SHORTCUT[0]}", f"{dif}.{SHORTCUT[1]}") if shortcut else [])


def _transformer(ldm: str, dif: str, depth: int) -> list[Rule]:
    names = [*TRANSFORMER_OUTER] + [f"transformer_blocks.{b}.{p}" for b in range(depth) for p in TRANSFORMER_BLOCK]
    return [Rule(f"{ldm}.{n}", (f"{dif}.{n}",)) for n in names]


def _down_rules(cfg: Mapping, layers: list[int], depth: list[int]) -> list[Rule]:
    chans, rules, n = list(cfg["block_out_channels"]), [], 1
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(layers[i]):
            c_in = (chans[max(i - 1, 0)] if j == 0 else chans[i])
            rules += _resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", c_in != chans[i])
            if DOWN_TYPES[kind]:
                rules += _transformer(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", depth[i])
            n += 1
        if i < len(chans) - 1:
            rules += pairs(f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
            n += 1
    return rules


def _up_rules(cfg: Mapping, layers: list[int], depth: list[int]) -> list[Rule]:
    """Up level i mirrors down level L-1-i; every up resnet takes a skip input, so all have a shortcut."""
    rules, n, last = [], 0, len(cfg["up_block_types"]) - 1
    rev_layers = list(reversed(layers))
    rev_depth = cfg.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    rev_depth = _per_level(rev_depth, last + 1, "reverse_transformer_layers_per_block")
    for i, kind in enumerate(cfg["up_block_types"]):
        attn = UP_TYPES[kind]
        for j in range(rev_layers[i] + 1):
            rules += _resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", True)
            if attn:
                rules += _transformer(f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", rev_depth[i])
            if j == rev_layers[i] and i < last:
                rules += pairs(f"output_blocks.{n}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv")
            n += 1
    return rules


def unet_keymap(cfg: Mapping) -> KeyMap:
    """The full UNet key map for a diffusers UNet2DConditionModel config."""
    _check_supported(cfg)
    levels = len(cfg["block_out_channels"])
    layers = _per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block")
    depth = _per_level(cfg.get("transformer_layers_per_block", 1) or 1, levels, "transformer_layers_per_block")
    rules = [r for a, b in TOP for r in pairs(a, b)]
    if cfg.get("addition_embed_type") == "text_time":
        rules += [r for a, b in ADD_EMBEDDING for r in pairs(a, b)]
    rules += _down_rules(cfg, layers, depth)
    rules += _resnet("middle_block.0", "mid_block.resnets.0", False)
    rules += _transformer("middle_block.1", "mid_block.attentions.0", depth[-1])
    rules += _resnet("middle_block.2", "mid_block.resnets.1", False)
    rules += _up_rules(cfg, layers, depth)
    return KeyMap("unet", tuple(rules))
