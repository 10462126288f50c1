"""VAE key map: diffusers `AutoencoderKL` <-> LDM `AutoencoderKL` (`first_stage_model.*`, or no prefix in
standalone VAE files).

Layout facts: encoder level i is `encoder.down.i` (`block.j` resnets, `downsample.conv` on all but the last
level); decoder up block i of diffusers is LDM `decoder.up.{L-1-i}` (LDM numbers them bottom-up), with
layers_per_block + 1 resnets and `upsample.conv` on all but the last diffusers block. Mid blocks are
`mid.block_1`, `mid.attn_1`, `mid.block_2`. LDM resnets say `nin_shortcut`, diffusers `conv_shortcut`;
`norm_out` is `conv_norm_out`. The mid attention stores q/k/v/proj_out as 1x1 conv weights [C, C, 1, 1]
where diffusers has linear weights [C, C] (to_q/to_k/to_v/to_out.0), and its norm is `group_norm`.
"""

from __future__ import annotations

from typing import Mapping

from .keymap import KeyMap, Rule, pairs

PREFIX = "first_stage_model."

RESNET = ("norm1", "conv1", "norm2", "conv2")
ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
TOP = (("encoder.conv_in", "encoder.conv_in"), ("encoder.norm_out", "encoder.conv_norm_out"),
       ("encoder.conv_out", "encoder.conv_out"), ("decoder.conv_in", "decoder.conv_in"),
       ("decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out", "decoder.conv_out"))
QUANT = (("use_quant_conv", "quant_conv"), ("use_post_quant_conv", "post_quant_conv"))


def _resnet(ldm: str, dif: str, shortcut: bool) -> list[Rule]:
    rules = [r for name in RESNET for r in pairs(f"{ldm}.{name}", f"{dif}.{name}")]
    return rules + (pairs(f"{ldm}.nin_shortcut", f"{dif}.conv_shortcut") if shortcut else [])


def _attention(ldm: str, dif: str) -> list[Rule]:
    rules = []
    for a, b in ATTENTION:
        op = "copy" if a == "norm" else "conv1x1"
        rules += [Rule(f"{ldm}.{a}.weight", (f"{dif}.{b}.weight",), op), Rule(f"{ldm}.{a}.bias", (f"{dif}.{b}.bias",))]
    return rules


def _mid(side: str, attention: bool) -> list[Rule]:
    rules = _resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", False)
    if attention:
        rules += _attention(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0")
    return rules + _resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", False)


def _encoder(chans: list[int], layers: int, attention: bool) -> list[Rule]:
    rules = []
    for i, c in enumerate(chans):
        for j in range(layers):
            c_in = chans[max(i - 1, 0)] if j == 0 else c
            rules += _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c_in != c)
        if i < len(chans) - 1:
            rules += pairs(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    return rules + _mid("encoder", attention)


def _decoder(chans: list[int], layers: int, attention: bool) -> list[Rule]:
    rules, rev, last = _mid("decoder", attention), list(reversed(chans)), len(chans) - 1
    for i, c in enumerate(rev):
        up = last - i
        for j in range(layers + 1):
            c_in = rev[max(i - 1, 0)] if j == 0 else c
            rules += _resnet(f"decoder.up.{up}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", c_in != c)
        if i < last:
            rules += pairs(f"decoder.up.{up}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    return rules


def vae_keymap(cfg: Mapping) -> KeyMap:
    """The full VAE key map for a diffusers AutoencoderKL config."""
    for key in ("down_block_types", "up_block_types"):
        bad = [t for t in cfg[key] if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D")]
        if bad:
            raise ValueError(f"vae config: block type {bad[0]!r} is not supported by the LDM key map")
    chans, layers = list(cfg["block_out_channels"]), int(cfg.get("layers_per_block", 1))
    attention = bool(cfg.get("mid_block_add_attention", True))
    rules = [r for a, b in TOP for r in pairs(a, b)]
    rules += [r for flag, name in QUANT if cfg.get(flag, True) for r in pairs(name, name)]
    rules += _encoder(chans, layers, attention) + _decoder(chans, layers, attention)
    return KeyMap("vae", tuple(rules))
