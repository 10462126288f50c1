"""`sdstack train text2image`: a `UNet2DConditionModel` and a `CLIPTextModel` (CLIP BPE tokenizer, SD 1.x layout:
final-layer-norm output, pad 49407, quick_gelu), trained jointly from scratch on the latents of a frozen VAE.

Noise: the diffusers/LDM discrete schedule (T timesteps), optionally rescaled to zero terminal SNR (Lin et al.
2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed") and trained with v-prediction
(v = sqrt(a) eps - sqrt(1 - a) x0), so the last timestep carries no signal and the model must take global
colour from the prompt, not from leftover low frequencies of the noise.

Loss: `sdstack.train.diffusion` (min-SNR-gamma weighting, shared with the fine-tune methods).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..models.bundle import ModelBundle
from ..models.tokenizer import ClipTokenizer
from .config import Text2ImageConfig
from .diffusion import diffusion_loss, snr_weights, training_alphas  # noqa: F401 (snr_weights: re-export)
from .loop import Task, seed_everything, train
from .plots import image_grid, save_png

PAD = 49407  # SD 1.x text encoders pad with <|endoftext|>


def scheduler_config(cfg: Text2ImageConfig) -> dict:
    """The diffusers scheduler_config.json of the trained model (EulerDiscreteScheduler keys)."""
    n = cfg.noise
    return {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": n.num_train_timesteps,
            "beta_start": n.beta_start, "beta_end": n.beta_end, "beta_schedule": n.beta_schedule,
            "prediction_type": n.prediction_type, "rescale_betas_zero_snr": n.zero_terminal_snr,
            "timestep_spacing": n.timestep_spacing, "steps_offset": 0}


def training_alphas_cumprod(cfg: Text2ImageConfig) -> torch.Tensor:
    """alpha_bar for training: with zero terminal SNR the last one is exactly 0 (sampling clamps it instead)."""
    return training_alphas(scheduler_config(cfg))


def build_unet(cfg: Text2ImageConfig, latent_channels: int, factor: int):
    from diffusers import UNet2DConditionModel

    u = cfg.unet
    if len(u.down_block_types) != len(u.block_out_channels) or len(u.up_block_types) != len(u.block_out_channels):
        raise UserError("config: unet.down_block_types and up_block_types need one entry per block_out_channels",
                        field="unet.block_out_channels")
    extra = {"addition_embed_type": u.addition_embed_type,
             "addition_embed_type_num_heads": u.addition_embed_type_num_heads} if u.addition_embed_type else {}
    return UNet2DConditionModel(
        sample_size=cfg.data.resolution // factor, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=u.block_out_channels, layers_per_block=u.layers_per_block,
        attention_head_dim=u.attention_head_dim, cross_attention_dim=u.cross_attention_dim,
        norm_num_groups=u.norm_num_groups, down_block_types=u.down_block_types, up_block_types=u.up_block_types,
        **extra)


def build_text_encoder(cfg: Text2ImageConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    t = cfg.text_encoder
    if t.hidden_size != cfg.unet.cross_attention_dim:
        raise UserError(f"config: text_encoder.hidden_size ({t.hidden_size}) must equal unet.cross_attention_dim "
                        f"({cfg.unet.cross_attention_dim})", field="text_encoder.hidden_size")
    conf = CLIPTextConfig(vocab_size=49408, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                          num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                          max_position_embeddings=77, hidden_act=t.hidden_act, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=PAD, projection_dim=t.hidden_size)
    model = CLIPTextModel(conf)
    if t.token_embedding_std > 0:
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=t.token_embedding_std)
    return model


def load_frozen_vae(path: str):
    from diffusers import AutoencoderKL

    from .autoencoder import resolve_vae_folder

    folder = resolve_vae_folder(path)
    if folder is None:
        raise UserError(f"config: vae: no trained VAE (config.json + safetensors) in {path}", field="vae")
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    return vae.eval().requires_grad_(False)


class Text2ImageModule(torch.nn.Module):
    """forward(noisy latents, timesteps, token ids) -> UNet prediction; DDP wraps this (both nets train)."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        context = self.text_encoder(input_ids=input_ids).last_hidden_state
        return self.unet(noisy, timesteps, encoder_hidden_states=context).sample


class Text2ImageTask(Task):
    def __init__(self, cfg: Text2ImageConfig):
        self.cfg = cfg
        self.vae = load_frozen_vae(cfg.vae)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scale = float(self.vae.config.scaling_factor)
        seed_everything(cfg.run.seed)
        unet = build_unet(cfg, int(self.vae.config.latent_channels), self.factor)
        self.module = Text2ImageModule(unet, build_text_encoder(cfg))
        self.tokenizer = ClipTokenizer(pad_token_id=PAD)
        self.alpha_bar = training_alphas_cumprod(cfg).float()

    def setup(self, accelerator):
        from .loop import resolve_precision

        self.device = accelerator.device
        self.vae.to(self.device)
        self.encode_bf16 = resolve_precision(self.cfg.vae_precision) == "bf16"

    def token_ids(self, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        drop = torch.rand(len(captions), generator=generator) < self.cfg.noise.caption_dropout
        return torch.tensor([self.tokenizer("" if d else c) for c, d in zip(captions, drop.tolist())])

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.encode_bf16):
            z = self.vae.encode(pixels.to(self.device)).latent_dist.mean
        return z.float() * self.scale

    def loss(self, model, batch, generator):
        x0 = self.latents(batch["pixels"])
        n = self.cfg.noise
        ids = self.token_ids(batch["captions"], generator).to(self.device)  # draws caption dropout first
        loss, per_sample = diffusion_loss(lambda noisy, t: model(noisy, t, ids), x0, self.alpha_bar,
                                          prediction_type=n.prediction_type, min_snr_gamma=n.min_snr_gamma,
                                          generator=generator)
        return loss, {"mse": float(per_sample.mean())}

    def bundle(self) -> ModelBundle:
        m = self.module
        return ModelBundle(family="sd1", unet=m.unet, vae=self.vae, text_encoders=[m.text_encoder],
                           tokenizers=[self.tokenizer], prediction_type=self.cfg.noise.prediction_type,
                           schedule=scheduler_config(self.cfg), name="training")

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> list:
        """One image per (prompt, seed), made by the engine exactly as `sdstack generate` makes it."""
        from ..engine.generate import generate
        from ..params import make_params

        s = self.cfg.sample
        bundle, images = self.bundle(), []
        self.module.eval()
        try:
            for prompt in prompts:
                for seed in seeds:
                    p = make_params(prompt=prompt, steps=s.steps, seed=seed, cfg_scale=s.cfg_scale,
                                    sampler_name=s.sampler, scheduler=s.scheduler)
                    images += generate(bundle, p).images
        finally:
            self.module.train()
        return images

    def samples(self, step: int, run_dir: Path) -> dict:
        s = self.cfg.sample
        images = self.generate(list(s.prompts), list(s.seeds))
        per_row = 2 if len(s.prompts) % 2 == 0 else 1
        labels = [" | ".join(s.prompts[i:i + per_row]) for i in range(0, len(s.prompts), per_row)]
        grid = image_grid(images, columns=len(s.seeds) * per_row, cell=96, labels=labels)
        save_png(grid, run_dir / "samples" / f"step-{step:08d}.png")
        save_png(grid, run_dir / "samples.png")
        if self.cfg.data.source == "shapes" and s.eval_prompts > 0:
            return {"eval": quick_eval(self, s.eval_prompts)}
        return {}

    def export(self, run_dir: Path) -> Path:
        return save_model_folder(self, run_dir / "model")


def quick_eval(task: Text2ImageTask, per_suite: int) -> str:
    """Oracle accuracy on the first `per_suite` prompts of each suite, one seed (a progress signal only)."""
    from ..eval.oracle import evaluate
    from ..eval.suites import SUITE_NAMES, Suite, get_suite

    parts = []
    for name in SUITE_NAMES:
        suite = get_suite(name)
        suite = Suite(name, suite.prompts[:: max(1, len(suite) // per_suite)][:per_suite])
        images = task.generate([p.text for p in suite.prompts], [0])
        parts.append(f"{name} {evaluate(images, suite)['accuracy']:.0%}")
    return " ".join(parts)


def save_model_folder(task: Text2ImageTask, out: Path) -> Path:
    """The diffusers folder `sdstack generate --model` and StableDiffusionPipeline.from_pretrained load."""
    from ..models.tiny import save_diffusers_folder

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bundle = task.bundle()
    bundle.schedule = {k: v for k, v in bundle.schedule.items() if k != "_class_name"}
    save_diffusers_folder(bundle, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _same_encoder(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(("encoder.", "quant_conv."))]
    same = all(k in sb and torch.equal(sa[k], sb[k]) for k in keys)
    return same and abs(float(a.config.scaling_factor) - float(b.config.scaling_factor)) < 1e-6


def model_from_checkpoint(source: str | Path, out: Path, *, vae: str | None = None, use_ema: bool = True) -> Path:
    """Build the diffusers folder from a text2image checkpoint (EMA weights unless `use_ema` is false),
    optionally with another VAE (a better decoder; its encoder must be the one the model was trained on)."""
    from .checkpoint import find_checkpoint, load_checkpoint
    from .config import load_config

    ckpt = find_checkpoint(source)
    cfg = load_config(ckpt / "config.toml", Text2ImageConfig)
    trained_on = cfg.vae
    if vae:
        cfg.vae = str(vae)
    task = Text2ImageTask(cfg)
    if vae and resolve_vae_folder_safe(trained_on) is not None:
        if not _same_encoder(load_frozen_vae(trained_on), task.vae):
            raise UserError(f"the VAE in {vae} has another encoder than the one the model was trained on "
                            f"({trained_on}); only its decoder may differ", field="vae")
    state = load_checkpoint(ckpt)
    task.module.load_state_dict(state["model"], strict=True)
    if use_ema and state.get("ema"):
        with torch.no_grad():
            for name, p in task.module.named_parameters():
                if name in state["ema"]["shadow"]:
                    p.copy_(state["ema"]["shadow"][name])
    task.device = torch.device("cpu")
    return save_model_folder(task, out)


def resolve_vae_folder_safe(path: str):
    from .autoencoder import resolve_vae_folder

    return resolve_vae_folder(path) if path else None


def export_model(source: str | Path, dest: str | Path, *, fp16: bool = True, vae: str | None = None,
                 use_ema: bool = True) -> Path:
    """Write the model of a run to `dest`, weights cast to fp16 if asked. `source`: a finished run (its model/),
    a diffusers folder, or (no finished model, or `vae` given) a run / checkpoint folder to build it from."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src, dest = Path(source), Path(dest)
    with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.is_dir() else None) as work:
        if vae is None and (src / "model" / "model_index.json").is_file():
            src = src / "model"
        elif vae is not None or not (src / "model_index.json").is_file():
            src = model_from_checkpoint(src, Path(work) / "model", vae=vae, use_ema=use_ema)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        dtype = torch.float16 if fp16 else torch.float32
        for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
            cls.from_pretrained(src / name).to(dtype).save_pretrained(tmp / name, safe_serialization=True)
            config = tmp / name / "config.json"  # diffusers records where it loaded from: a temp path, drop it
            config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                          if k != "_name_or_path"}, indent=2, sort_keys=True) + "\n")
    json.loads((tmp / "model_index.json").read_text())  # sanity: copied intact
    for f in tmp.rglob("*"):  # readable by everyone (a shipped package is installed for other users too)
        f.chmod(0o755 if f.is_dir() else 0o644)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def init_weights(path: str) -> dict[str, torch.Tensor]:
    """The `Text2ImageModule` state ("unet.*", "text_encoder.*") that `init_from` names: a diffusers model folder
    (unet/ and text_encoder/ safetensors) or a text2image run / checkpoint folder (EMA weights where it has them)."""
    from safetensors.torch import load_file

    from .checkpoint import find_checkpoint, load_checkpoint

    p = Path(path)
    if (p / "model_index.json").is_file():
        weights = {}
        for name in ("unet", "text_encoder"):
            files = sorted((p / name).glob("*.safetensors")) if (p / name).is_dir() else []
            if not files:
                raise UserError(f"init_from: no {name}/*.safetensors in {p}", field="init_from")
            for f in files:
                weights.update({f"{name}.{k}": v for k, v in load_file(f).items()})
        return weights
    if not p.exists():
        raise UserError(f"init_from: {p} does not exist", field="init_from")
    try:
        ckpt = find_checkpoint(p)
    except UserError:
        raise UserError(f"init_from: {p} is neither a model folder (model_index.json) nor a text2image run or "
                        "checkpoint", field="init_from") from None
    state = load_checkpoint(ckpt)
    weights = dict(state["model"])
    weights.update((state.get("ema") or {}).get("shadow", {}))
    return weights


def _widen_token_table(weights: dict, own: dict, path: str) -> None:
    """A model folder with a trimmed vocabulary (`sdstack train trim-vocab`, as the built-in model's) has fewer token
    rows than the config's CLIP vocabulary: its rows go to their tokens' CLIP ids, the other rows keep the fresh
    initialisation (as they were before the trim: untrained)."""
    from ..models.tokenizer import VOCAB_SIZE, ClipTokenizer

    for key, table in list(weights.items()):
        if not key.endswith("embeddings.token_embedding.weight") or key not in own:
            continue
        if table.shape[0] == own[key].shape[0] or own[key].shape[0] != VOCAB_SIZE:
            continue
        try:
            trimmed = ClipTokenizer.from_pretrained(Path(path) / "tokenizer")
        except ValueError as e:
            raise UserError(f"init_from: {path} has {table.shape[0]} token rows and no readable vocabulary: {e}",
                            field="init_from") from None
        if trimmed.vocab_size != table.shape[0]:
            raise UserError(f"init_from: {path}/tokenizer has {trimmed.vocab_size} tokens, the text encoder "
                            f"{table.shape[0]}", field="init_from")
        wide = own[key].detach().clone()
        wide[torch.tensor(trimmed.row_index(ClipTokenizer()))] = table.to(wide.dtype)
        weights[key] = wide


def load_init_weights(module: Text2ImageModule, path: str) -> None:
    """Overwrite the module's weights with those `init_from` names (cast to the module's dtypes); a model of
    another architecture stops with one line."""
    weights = init_weights(path)
    own = module.state_dict()
    _widen_token_table(weights, own, path)
    missing = [k for k in own if k not in weights and not k.endswith("position_ids")]
    unexpected = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else
                f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else
                f"{wrong[0]} is {tuple(weights[wrong[0]].shape)}, the config makes {tuple(own[wrong[0]].shape)}")
        raise UserError(f"init_from: the weights in {path} do not fit the [unet]/[text_encoder] config: {what}",
                        field="init_from")
    with torch.no_grad():
        for k, v in own.items():
            if k in weights:
                v.copy_(weights[k].to(v.dtype))


def train_text2image(cfg: Text2ImageConfig, *, resume=None, stop_at: int | None = None) -> dict:
    task = Text2ImageTask(cfg)
    if cfg.init_from and resume is None:
        load_init_weights(task.module, cfg.init_from)
    return train(cfg, task, resume=resume, stop_at=stop_at)
