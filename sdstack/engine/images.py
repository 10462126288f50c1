"""Pixels <-> latents, A1111's img2img resize modes, and the cheap live preview."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import UserError


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1,3,H,W] in [-1, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1, 1] -> PIL images (rounded, not truncated)."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(img) for img in a]


def open_image(path_or_image) -> Image.Image:
    if isinstance(path_or_image, Image.Image):
        return path_or_image
    try:
        with Image.open(path_or_image) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"init image not found: {path_or_image}", field="init_images") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read init image {path_or_image}: {e}", field="init_images") from None


def resize_image(img: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111 resize modes: 0 just resize, 1 crop and resize, 2 resize and fill; 3 = 0 here (latent later)."""
    img = img.convert("RGB")
    if mode in (0, 3):
        return img.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, img.width / img.height
    if mode == 1:
        w = width if ratio > src_ratio else img.width * height // img.height
        h = height if ratio <= src_ratio else img.height * width // img.width
        resized = img.resize((w, h), Image.LANCZOS)
        out = Image.new("RGB", (width, height))
        out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
        return out
    w = width if ratio < src_ratio else img.width * height // img.height
    h = height if ratio >= src_ratio else img.height * width // img.width
    resized = img.resize((w, h), Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    if ratio < src_ratio and h < height:  # fill top/bottom by stretching the edge rows
        fill = height // 2 - h // 2
        out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + h))
    elif ratio > src_ratio and w < width:
        fill = width // 2 - w // 2
        out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + w, 0))
    return out


@torch.no_grad()
def encode(bundle, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [-1,1] -> scaled latents (posterior mean, so img2img is deterministic)."""
    vae = bundle.vae
    p = next(vae.parameters())
    mean = vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mean.float()
    return (mean - bundle.vae_shift_factor) * bundle.vae_scaling_factor


@torch.no_grad()
def decode(bundle, latents: torch.Tensor) -> torch.Tensor:
    vae = bundle.vae
    p = next(vae.parameters())
    z = latents / bundle.vae_scaling_factor + bundle.vae_shift_factor
    return vae.decode(z.to(p.device, p.dtype)).sample.float()


@torch.no_grad()
def preview_projection(bundle) -> torch.Tensor:
    """A [C+1, 3] linear map latent -> RGB for live previews, fitted once per model by least squares
    on VAE encodings of a fixed colour test card (works for any VAE, not just SD's)."""
    cached = getattr(bundle, "_preview_projection", None)
    if cached is not None:
        return cached
    f = bundle.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    cells = torch.rand(1, 3, 6, 6, generator=g) * 2 - 1
    card = torch.nn.functional.interpolate(cells, scale_factor=8 * f, mode="nearest")
    lat = encode(bundle, card).cpu()
    lat_px = torch.nn.functional.avg_pool2d(lat, 8)  # one latent vector per colour cell
    rows = lat_px.flatten(2).squeeze(0).T
    A = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
    proj = torch.linalg.lstsq(A.double(), cells.flatten(2).squeeze(0).T.double()).solution.float()
    bundle._preview_projection = proj
    return proj


def latent_preview(bundle, latents: torch.Tensor) -> Image.Image:
    """Cheap preview of the first image of a batch: a linear latent->RGB map, upscaled by nearest."""
    proj = preview_projection(bundle)
    z = latents[0].float().cpu()
    rgb = torch.einsum("chw,cr->rhw", torch.cat([z, torch.ones_like(z[:1])]), proj)
    rgb = torch.nn.functional.interpolate(rgb.unsqueeze(0), scale_factor=bundle.vae_scale_factor, mode="nearest")
    return tensor_to_pil(rgb)[0]
