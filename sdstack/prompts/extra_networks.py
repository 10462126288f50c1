"""Extra-network tags in prompts: ``<lora:name:0.8>``, ``<hypernet:name:1>`` (A1111 `modules/extra_networks.py`).

A tag is ``<kind:arg1:arg2...>`` (regex ``<(\\w+):([^>]+)>``); it is removed from the prompt text and returned as an
:class:`ExtraNetworkCall`. Arguments are split on ``:``; an argument with exactly one ``=`` is named (``te=0.5``).
LoRA arguments follow A1111's built-in Lora extension: ``<lora:name:te[:unet[:dyn]]>`` or named ``te=``, ``unet=``,
``dyn=``; ``lyco`` is an alias of ``lora``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sdstack.errors import UserError

__all__ = [
    "ExtraNetworkCall",
    "parse_extra_networks",
    "lora_weights",
    "lora_dyn_dim",
    "format_lora_hashes",
    "LORA_KINDS",
]

_RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class ExtraNetworkCall:
    """One ``<kind:args>`` tag: ``items`` as written; ``positional`` and ``named`` split from them."""

    kind: str
    items: tuple[str, ...]
    positional: tuple[str, ...] = field(init=False)
    named: dict[str, str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        positional, named = [], {}
        for item in self.items:
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        object.__setattr__(self, "positional", tuple(positional))
        object.__setattr__(self, "named", named)

    @property
    def name(self) -> str | None:
        """The first positional argument (the network's file name for LoRA/hypernet), if any."""
        return self.positional[0] if self.positional else None

    def __str__(self) -> str:
        return f"<{self.kind}:{':'.join(self.items)}>"


def parse_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkCall]]:
    """Remove every ``<kind:args>`` tag from ``prompt``; return the remaining text and the calls in order."""
    calls: list[ExtraNetworkCall] = []

    def found(m: re.Match) -> str:
        calls.append(ExtraNetworkCall(m.group(1), tuple(m.group(2).split(":"))))
        return ""

    return _RE_EXTRA_NET.sub(found, prompt), calls


def _number(call: ExtraNetworkCall, what: str, text: str, cast=float):
    try:
        return cast(text)
    except ValueError:
        raise UserError(f"bad {what} {text!r} in {call}: expected a number", field="prompt") from None


def lora_weights(call: ExtraNetworkCall) -> tuple[str, float, float]:
    """``(name, te_weight, unet_weight)`` of a ``<lora:...>`` / ``<lyco:...>`` call.

    ``te`` is the second positional argument or ``te=`` (default 1.0); ``unet`` is the third positional or
    ``unet=`` and defaults to ``te``.
    """
    if call.kind not in LORA_KINDS:
        raise ValueError(f"not a LoRA call: {call}")
    if call.name is None:
        raise UserError(f"{call} names no LoRA: write <lora:name:weight>", field="prompt")
    pos = call.positional
    te = _number(call, "text encoder weight", pos[1]) if len(pos) > 1 else 1.0
    if "te" in call.named:
        te = _number(call, "text encoder weight", call.named["te"])
    unet = _number(call, "unet weight", pos[2]) if len(pos) > 2 else te
    if "unet" in call.named:
        unet = _number(call, "unet weight", call.named["unet"])
    return call.name, te, unet


def lora_dyn_dim(call: ExtraNetworkCall) -> int | None:
    """The optional ``dyn`` rank limit: fourth positional argument or ``dyn=``; None when absent."""
    pos = call.positional
    dyn = _number(call, "dyn", pos[3], int) if len(pos) > 3 else None
    if "dyn" in call.named:
        dyn = _number(call, "dyn", call.named["dyn"], int)
    return dyn


def format_lora_hashes(hashes: Mapping[str, str]) -> str:
    """The infotext ``Lora hashes`` value: ``"name: hash, name: hash"`` with ``:`` and ``,`` dropped from names."""
    table = str.maketrans("", "", ":,")
    return ", ".join(f"{name.translate(table)}: {short}" for name, short in hashes.items())
