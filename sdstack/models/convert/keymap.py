"""The key-map machinery shared by the UNet, VAE and text-encoder maps.

A component's map is a list of `Rule`s generated from its diffusers config. Each rule ties one LDM key
(the name inside the component, without its prefix such as `model.diffusion_model.`) to one diffusers
key, or to three for OpenCLIP's fused q/k/v projection, with the tensor transform between them. Applying
a map is strict: every expected key must be present and every present key must be expected, except the
few a map declares `droppable` (present in real files, not part of the diffusers module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from sdstack.errors import CheckpointKeyError

OPS = ("copy", "conv1x1", "transpose", "qkv")


@dataclass(frozen=True)
class Rule:
    """One LDM tensor <-> its diffusers tensor(s).

    op: "copy" (same tensor); "conv1x1" (LDM [C, C, 1, 1] conv weight <-> diffusers [C, C] linear);
    "transpose" (OpenCLIP `x @ W` projection <-> nn.Linear weight); "qkv" (one fused [3C, ...] tensor
    <-> three [C, ...] tensors q, k, v in that order).
    """

    ldm: str
    diffusers: tuple[str, ...]
    op: str = "copy"

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown key-map op {self.op!r}")
        if (len(self.diffusers) == 3) != (self.op == "qkv"):
            raise ValueError(f"rule {self.ldm!r}: op {self.op!r} takes {'3' if self.op == 'qkv' else '1'} keys")


@dataclass(frozen=True)
class KeyMap:
    """A component's rules, plus LDM keys that real files carry and the diffusers module has no slot for."""

    component: str
    rules: tuple[Rule, ...]
    droppable: frozenset[str] = field(default_factory=frozenset)

    @property
    def ldm_keys(self) -> list[str]:
        return [r.ldm for r in self.rules]

    @property
    def diffusers_keys(self) -> list[str]:
        return [k for r in self.rules for k in r.diffusers]


def pairs(ldm_module: str, diffusers_module: str, params: Iterable[str] = ("weight", "bias")) -> list[Rule]:
    """Copy rules for `<module>.<param>` under two module names (the common case)."""
    return [Rule(f"{ldm_module}.{p}", (f"{diffusers_module}.{p}",)) for p in params]


def key_error(component: str, missing: Iterable[str], unexpected: Iterable[str], shown: int = 5) -> CheckpointKeyError:
    """A CheckpointKeyError naming the first few missing/unexpected keys and how many there are in all."""
    parts = []
    for label, keys in (("missing", sorted(missing)), ("unexpected", sorted(unexpected))):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {label} key(s): " + ", ".join(keys[:shown]) + more)
    return CheckpointKeyError(f"{component}: state dict does not match the architecture; " + "; ".join(parts))


def check_keys(component: str, expected: Iterable[str], given: Iterable[str], allowed: Iterable[str] = ()) -> None:
    """Raise CheckpointKeyError unless `given` == `expected` (keys in `allowed` may be present or not)."""
    expected, given, allowed = set(expected), set(given), set(allowed)
    missing = expected - given
    unexpected = given - expected - allowed
    if missing or unexpected:
        raise key_error(component, missing, unexpected)


def check_shapes(component: str, expected: Mapping[str, Iterable[int]], sd: Mapping[str, torch.Tensor],
                 shown: int = 5) -> None:
    """Raise CheckpointKeyError naming the tensors whose shape differs from `expected[key]`."""
    bad = [(k, list(sd[k].shape), list(s)) for k, s in expected.items() if k in sd and tuple(sd[k].shape) != tuple(s)]
    if bad:
        more = f", ... ({len(bad)} in all)" if len(bad) > shown else ""
        listed = ", ".join(f"{k} is {got}, expected {want}" for k, got, want in bad[:shown])
        raise CheckpointKeyError(f"{component}: tensor shapes do not match the architecture: {listed}{more}")


def _squeeze_conv1x1(t: torch.Tensor, key: str) -> torch.Tensor:
    if t.ndim == 2:
        return t
    if t.ndim in (3, 4) and all(s == 1 for s in t.shape[2:]):
        return t.reshape(t.shape[0], t.shape[1])
    raise CheckpointKeyError(f"{key}: expected a 1x1 conv weight, got shape {list(t.shape)}")


def _split_qkv(t: torch.Tensor, key: str) -> tuple[torch.Tensor, ...]:
    if t.shape[0] % 3:
        raise CheckpointKeyError(f"{key}: fused q/k/v tensor of shape {list(t.shape)} does not split in three")
    return tuple(c.clone() for c in t.chunk(3, dim=0))


def to_diffusers(keymap: KeyMap, sd: Mapping[str, torch.Tensor], label: str = "") -> dict[str, torch.Tensor]:
    """LDM component state dict (prefix removed) -> diffusers state dict, strictly."""
    check_keys(label or keymap.component, keymap.ldm_keys, sd.keys(), keymap.droppable)
    out: dict[str, torch.Tensor] = {}
    for r in keymap.rules:
        t = sd[r.ldm]
        if r.op == "copy":
            out[r.diffusers[0]] = t
        elif r.op == "conv1x1":
            out[r.diffusers[0]] = _squeeze_conv1x1(t, r.ldm)
        elif r.op == "transpose":
            out[r.diffusers[0]] = t.T.contiguous()
        else:
            out.update(zip(r.diffusers, _split_qkv(t, r.ldm)))
    return out


def to_ldm(keymap: KeyMap, sd: Mapping[str, torch.Tensor], label: str = "") -> dict[str, torch.Tensor]:
    """Diffusers state dict -> LDM component state dict (prefix not added), strictly."""
    check_keys(label or keymap.component, keymap.diffusers_keys, sd.keys())
    out: dict[str, torch.Tensor] = {}
    for r in keymap.rules:
        ts = [sd[k] for k in r.diffusers]
        if r.op == "copy":
            out[r.ldm] = ts[0]
        elif r.op == "conv1x1":
            out[r.ldm] = ts[0].reshape(*ts[0].shape, 1, 1)
        elif r.op == "transpose":
            out[r.ldm] = ts[0].T.contiguous()
        else:
            out[r.ldm] = torch.cat(ts, dim=0)
    return out
