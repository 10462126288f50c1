"""`sdstack train autoencoder`: an `AutoencoderKL` trained from scratch (or fine-tuned, e.g. decoder only) on
full images with an edge-weighted L1 + MSE reconstruction loss and a small KL term.

Edge weighting: pixels within one pixel of a colour edge of the target weigh 1 + edge_weight, because small
shapes (stars, hexagons) live in their edges and a plain pixel loss lets them melt into blobs. The exported VAE's
`scaling_factor` is set to 1 / std of the latents of training images, as SD's 0.18215 was, except when the
encoder stayed frozen from a VAE folder (decoder-only stages): then the folder's factor stays.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .config import AutoencoderConfig
from .data import TrainingImages, to_pil, to_tensor
from .loop import Task, seed_everything, train
from .plots import image_grid, save_png

SAMPLE_INDICES = range(10**9, 10**9 + 8)  # fixed shapes-world images shown in every sample grid


def build_vae(cfg: AutoencoderConfig):
    """A fresh AutoencoderKL per `cfg.model`, or the one `cfg.init_from` names (a VAE folder, an autoencoder
    run folder (its vae/, else its latest checkpoint) or a checkpoint folder)."""
    from diffusers import AutoencoderKL

    if cfg.init_from:
        folder = resolve_vae_folder(cfg.init_from)
        if folder is not None:
            return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    m = cfg.model
    n = len(m.block_out_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=m.latent_channels,
                        block_out_channels=m.block_out_channels, layers_per_block=m.layers_per_block,
                        norm_num_groups=m.norm_num_groups, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, sample_size=cfg.data.resolution,
                        mid_block_add_attention=m.mid_block_attention)
    if cfg.init_from:
        _load_checkpoint_vae(vae, cfg.init_from)
    return vae


def _load_checkpoint_vae(vae, path) -> None:
    from ..errors import UserError
    from .checkpoint import load_checkpoint

    try:
        state = load_checkpoint(path)["model"]
    except UserError:
        raise UserError(f"init_from: no VAE folder or autoencoder checkpoint in {path}", field="init_from") from None
    sd = {k.removeprefix("vae."): v for k, v in state.items()}
    try:
        vae.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"init_from: the checkpoint in {path} does not fit [model]: {str(e).splitlines()[0]}",
                        field="init_from") from None


def resolve_vae_folder(path: str | Path) -> Path | None:
    """A VAE folder: the path itself, its `vae/` (a model or an autoencoder run), or None."""
    p = Path(path)
    for cand in (p, p / "vae"):
        if (cand / "config.json").is_file() and any(cand.glob("*.safetensors")):
            return cand
    return None


class AutoencoderModule(torch.nn.Module):
    """forward(x, generator) -> (reconstruction, posterior mean, posterior logvar); DDP wraps this."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, transform=None):
        """`transform(z) -> z` (no gradient) replaces latents before decoding (decoder-only stages)."""
        post = self.vae.encode(x).latent_dist
        noise = torch.randn(post.mean.shape, generator=generator, dtype=torch.float32).to(post.mean)
        z = post.mean + post.std * noise
        if transform is not None:
            with torch.no_grad():
                z = transform(z.detach())
        return self.vae.decode(z).sample, post.mean, post.logvar


def edge_weights(x: torch.Tensor, strength: float) -> torch.Tensor:
    """1 + strength where a pixel or a neighbour differs from its neighbours by a visible step (max over RGB)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True)
    edge = torch.zeros_like(x[:, :1])
    edge[..., :, 1:] = torch.maximum(edge[..., :, 1:], dx)
    edge[..., :, :-1] = torch.maximum(edge[..., :, :-1], dx)
    edge[..., 1:, :] = torch.maximum(edge[..., 1:, :], dy)
    edge[..., :-1, :] = torch.maximum(edge[..., :-1, :], dy)
    edge = F.max_pool2d((edge > 0.05).float(), 3, stride=1, padding=1)
    return 1.0 + strength * edge


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, cfg) -> tuple[torch.Tensor, dict]:
    w = edge_weights(target, cfg.edge_weight)
    err = recon.float() - target
    l1 = (w * err.abs()).mean() / w.mean()
    mse = (w * err.square()).mean() / w.mean()
    loss, logs = cfg.l1_weight * l1 + cfg.mse_weight * mse, {"l1": float(l1.detach()), "mse": float(mse.detach())}
    if cfg.grad_weight > 0:
        g = gradient_loss(recon.float(), target)
        loss, logs["grad"] = loss + cfg.grad_weight * g, float(g.detach())
    return loss, logs


def gradient_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between horizontal and vertical pixel differences: blurred corners cost directly."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return 0.5 * ((dx(recon) - dx(target)).abs().mean() + (dy(recon) - dy(target)).abs().mean())


class ModelEstimates:
    """The latents a diffusion model samples, for a decoder to learn (`loss.denoise_*`): the encoder's latent
    noised to a timestep in `denoise_t` and denoised once, guided, through the engine's own denoiser (the same
    CFG, CFG rescale and UNet path as `sdstack generate`, whose last step returns such an estimate)."""

    def __init__(self, loss_cfg, device):
        from ..models.loader import load_model

        self.cfg = loss_cfg
        self.bundle = load_model(loss_cfg.denoise_model, device=device)
        self.scale = float(self.bundle.vae.config.scaling_factor)
        self.bundle.vae = None  # only the UNet and text encoder are used; the decoder in training is ours

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        from ..engine.guidance import CFGDenoiser
        from ..prompts.conditioning import TextConditioner

        text = TextConditioner(self.bundle)  # a fresh cache per batch: world captions rarely repeat
        never = 10**9  # one schedule entry for every step
        pos = [[(1.0, [(never, text(c))])] for c in captions]
        neg = [[(never, text(""))] for _ in captions]
        denoiser = CFGDenoiser(self.bundle, pos, neg, self.cfg.denoise_cfg, rescale=-1)
        lo, hi = self.cfg.denoise_t
        t = torch.randint(lo, hi + 1, (z.shape[0],), generator=generator).float()
        sigma = denoiser.inner.schedule.t_to_sigma(t).to(z.device)
        eps = torch.randn(z.shape, generator=generator).to(z)
        x0 = z.float() * self.scale
        noisy = x0 + sigma.reshape(-1, 1, 1, 1) * eps  # k-diffusion convention: x = x0 + sigma * eps
        return (denoiser(noisy, sigma).float() / self.scale).to(z.dtype)


class AutoencoderTask(Task):
    def __init__(self, cfg: AutoencoderConfig):
        self.cfg = cfg
        seed_everything(cfg.run.seed)
        vae = build_vae(cfg)
        # a frozen encoder keeps the latent space, so the scaling factor of the VAE folder it came from must stay
        # too (a UNet trained on those latents depends on it); otherwise export measures it afresh
        self.kept_scale = None
        if not cfg.loss.train_encoder:
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)
            if cfg.init_from and resolve_vae_folder(cfg.init_from) is not None:
                self.kept_scale = float(vae.config.scaling_factor)
        self.module = AutoencoderModule(vae)

    def loss(self, model, batch, generator):
        x = batch["pixels"].to(self.device)
        transform = None
        share = self.cfg.loss.denoise_share
        if share > 0:
            # a fixed number of images a batch (randomly chosen): one UNet input shape, so one traced graph
            k = round(share * x.shape[0])
            idx = sorted(torch.randperm(x.shape[0], generator=generator)[:k].tolist())
            if idx:
                captions = [batch["captions"][i] for i in idx]

                def transform(z):
                    z = z.clone()
                    z[idx] = self.estimates(z[idx], captions, generator)
                    return z
        recon, mean, logvar = model(x, generator, transform)
        rec, logs = reconstruction_loss(recon, x, self.cfg.loss)
        kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1 - logvar.float()).mean()
        logs["kl"] = float(kl.detach())
        return rec + self.cfg.loss.kl_weight * kl, logs

    def setup(self, accelerator):
        self.device = accelerator.device
        self.estimates = ModelEstimates(self.cfg.loss, self.device) if self.cfg.loss.denoise_share > 0 else None

    def _sample_images(self) -> list:
        data = TrainingImages(self.cfg.data)
        if data.size is None:
            return [data.source.sample(i)[0] for i in SAMPLE_INDICES]
        return [data.source[i][0] for i in range(min(8, data.size))]

    @torch.no_grad()
    def samples(self, step: int, run_dir: Path) -> dict:
        vae = self.module.vae
        vae.eval()
        originals = self._sample_images()
        x = torch.stack([to_tensor(im) for im in originals]).to(self.device)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        grid = image_grid(originals + [to_pil(r) for r in recon], columns=len(originals), cell=96)
        save_png(grid, run_dir / "samples" / f"step-{step:08d}.png")
        save_png(grid, run_dir / "samples.png")
        info = {}
        if self.cfg.data.source == "shapes":
            from .vae_check import oracle_round_trip

            scores = oracle_round_trip(vae, per_suite=12, resolution=self.cfg.data.resolution)
            info["oracle"] = " ".join(f"{k} {v:.0%}" for k, v in scores.items())
        vae.train()
        return info

    def export(self, run_dir: Path) -> Path:
        vae = self.module.vae
        vae.eval()
        if self.kept_scale is not None:
            vae.register_to_config(scaling_factor=self.kept_scale)
        else:
            std = latent_std(vae, TrainingImages(self.cfg.data), self.device)
            vae.register_to_config(scaling_factor=float(1.0 / std))
        out = run_dir / "vae"
        vae.save_pretrained(out, safe_serialization=True)
        return out


@torch.no_grad()
def latent_std(vae, data: TrainingImages, device, n: int = 256) -> float:
    idx = range(10**8, 10**8 + n) if data.size is None else range(min(n, data.size))
    zs = []
    for start in range(0, len(idx), 32):
        x = torch.stack([data[i][0] for i in idx[start:start + 32]]).to(device)
        zs.append(vae.encode(x).latent_dist.mean.float())
    return float(torch.cat(zs).std())


def train_autoencoder(cfg: AutoencoderConfig, *, resume=None, stop_at: int | None = None) -> dict:
    return train(cfg, AutoencoderTask(cfg), resume=resume, stop_at=stop_at)
