"""Inference speed settings: dtype (bf16 on CPUs with AVX-512 bf16, fp16/bf16 on GPUs) and channels_last."""

from __future__ import annotations

import torch


def set_inference_dtype(bundle, dtype: torch.dtype = torch.float32, channels_last: bool = False):
    """Cast the networks to `dtype` (one way: casting back does not restore the lost bits) and optionally put
    the UNet and VAE in channels_last memory format. Sampling math stays in float32 (see engine.guidance)."""
    for m in [bundle.unet, bundle.vae, *bundle.text_encoders]:
        m.to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    bundle.unet.to(memory_format=fmt)
    bundle.vae.to(memory_format=fmt)
    return bundle


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmul (AVX-512 BF16 or AMX)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
