"""Inference speed settings: dtype (bf16 on CPUs with AVX-512 bf16, fp16/bf16 on GPUs) and channels_last."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def prepare_for_inference(bundle, dtype: torch.dtype = torch.float32, channels_last: bool = False):
    """Temporarily cast the networks to `dtype` (and the UNet/VAE to channels_last); restores afterwards."""
    modules = [bundle.unet, bundle.vae, *bundle.text_encoders]
    before = [next(m.parameters()).dtype for m in modules]
    try:
        for m in modules:
            m.to(dtype)
        if channels_last:
            bundle.unet.to(memory_format=torch.channels_last)
            bundle.vae.to(memory_format=torch.channels_last)
        yield bundle
    finally:
        for m, d in zip(modules, before):
            m.to(d)
        if channels_last:
            bundle.unet.to(memory_format=torch.contiguous_format)
            bundle.vae.to(memory_format=torch.contiguous_format)


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmul (AVX-512 BF16 or AMX)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
