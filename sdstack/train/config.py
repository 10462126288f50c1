"""Training configs: typed dataclasses that a TOML file maps onto, strictly (unknown keys and wrong types are a
`UserError` naming the key). The resolved config is saved as TOML with every checkpoint.

    cfg = load_config("configs/shapes-v1/autoencoder.toml", AutoencoderConfig)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..tomlio import read_toml

MIXED_PRECISIONS = ("no", "bf16", "auto")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
DATA_SOURCES = ("shapes", "folder")


@dataclass
class RunConfig:
    out: str = "runs/train"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 16  # per process, per micro-step
    grad_accum: int = 1
    mixed_precision: str = "auto"  # "auto": bf16 autocast where the CPU supports it (or on CUDA), else fp32
    threads: int = 0  # torch CPU threads; 0 = torch's default
    workers: int = 0  # DataLoader worker processes (0: load in the training process)
    checkpoint_every: int = 500  # steps; 0 = only at the end
    checkpoint_minutes: float = 0.0  # also checkpoint when this much wall time passed since the last one; 0 = off
    keep_checkpoints: int = 2
    sample_every: int = 500  # steps between sample grids and loss-curve PNGs; 0 = off
    log_every: int = 10
    validate_every: int = 0  # steps between validation losses on the held-out split (tasks that have one)
    progress: bool = True


@dataclass
class DataConfig:
    source: str = "shapes"  # "shapes": the synthetic shapes world; "folder": images with same-name captions
    path: str = ""  # the image folder (source = "folder")
    resolution: int = 64
    split: str = "train"  # shapes world split
    world_seed: int = 0  # shapes world seed
    # shapes world: how often each kind of caption is drawn, one weight per kind in the order single, relation,
    # counting, two, list (sdstack.data.shapes.KIND_WEIGHTS); empty = the world's default mix
    kind_weights: tuple[float, ...] = ()
    caption_ext: str = ".txt"
    random_flip: bool = False
    # shapes world, for codec (autoencoder) training: the share of images whose objects carry a band of another
    # palette colour inside their edge, detail_widths pixels wide at 64x64 (captions do not say so)
    detail_share: float = 0.0
    detail_widths: tuple[float, float] = (1.0, 3.0)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 100
    decay: str = "cosine"  # "cosine", "linear" or "constant" (after warm-up)
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    optimizer: str = "adamw"  # "adamw" (torch) or "adamw8bit" (bitsandbytes: pip install 'sdstack[8bit]')


@dataclass
class EMAConfig:
    decay: float = 0.999  # 0 = no EMA
    warmup: bool = True  # effective decay min(decay, (1 + step) / (10 + step))


@dataclass
class AutoencoderModelConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_attention: bool = False


@dataclass
class AutoencoderLossConfig:
    kl_weight: float = 1e-6
    edge_weight: float = 4.0  # pixels near colour edges weigh 1 + edge_weight
    mse_weight: float = 1.0
    l1_weight: float = 1.0
    grad_weight: float = 0.0  # L1 between the image gradients (finite differences) of output and target: corners
    train_encoder: bool = True  # false: only the decoder trains (fine-tuning a decoder)
    # Decoder-only stages: teach the decoder the latents a diffusion model actually produces. A sampled image's
    # last latent is the model's guided one-step estimate of the clean latent at the last step's noise level
    # (t ~ 50 of 1000 for 20 steps), which lies off the encoder's manifold. For a share of each batch the
    # encoder's latent is noised to a timestep in denoise_t, denoised once by `denoise_model` (its UNet and text
    # encoder, the batch's captions, CFG denoise_cfg with the engine's automatic CFG rescale), and the decoder
    # learns to draw the original image from that estimate.
    denoise_model: str = ""  # a model folder whose UNet was trained on this VAE's latents ("" = off)
    denoise_share: float = 0.0  # share of each batch decoded from the model's estimate
    denoise_t: tuple[int, int] = (20, 100)  # timestep range (inclusive) the estimate is taken at
    denoise_cfg: float = 7.0


@dataclass
class AutoencoderConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decay=0.0))
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    init_from: str = ""  # start from: a VAE folder, an autoencoder run folder or one of its checkpoints


@dataclass
class UNetConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 4  # diffusers (SD 1.x legacy) reads this as the number of heads
    cross_attention_dim: int = 128
    norm_num_groups: int = 16
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    # "text": diffusers' TextTimeEmbedding, an attention pooling of the text encoder's output added to the
    # timestep embedding, so every ResNet block gets the prompt as a global signal (as class labels condition
    # class-conditional diffusion models), besides cross-attention. Stock StableDiffusionPipeline runs it (it
    # needs only encoder_hidden_states). "" = none (SD 1.x).
    addition_embed_type: str = ""
    addition_embed_type_num_heads: int = 4


@dataclass
class TextEncoderConfig:
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    hidden_act: str = "quick_gelu"
    # std of the token-embedding init; 0 keeps CLIP's (0.02). CLIP's small init makes every word's output nearly
    # the same at the start (cosine ~0.94 after the final layer norm), so the UNet first learns only what is
    # easiest (colour) and shape, place and count words stay indistinct; a larger std gives each word its own
    # direction from step 0
    token_embedding_std: float = 0.0


@dataclass
class NoiseConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = True  # Lin et al. 2023; needs v_prediction
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"  # written to the scheduler config, for sampling
    min_snr_gamma: float = 5.0  # 0 = plain MSE
    caption_dropout: float = 0.1  # share of captions replaced by "" (for classifier-free guidance)


@dataclass
class SampleConfig:
    prompts: tuple[str, ...] = ("a red circle", "a blue square on yellow background", "two green triangles",
                                "a white star to the left of a black heart")
    seeds: tuple[int, ...] = (1, 2)
    steps: int = 20
    cfg_scale: float = 5.0
    sampler: str = "Euler"
    scheduler: str = "SGM Uniform"  # trailing timesteps, as the model's scheduler config says
    eval_prompts: int = 0  # with the shapes world: oracle accuracy on this many prompts per suite at each sample


@dataclass
class Text2ImageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4))
    ema: EMAConfig = field(default_factory=EMAConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    vae: str = ""  # the trained VAE: a diffusers VAE folder, or an autoencoder run folder (its final vae/)
    vae_precision: str = "auto"  # encoding the training images: "auto" (bf16 where supported, 2x faster) or "no"
    # start the UNet and text encoder from trained weights instead of a random init (a fresh optimizer and LR
    # schedule; --resume continues a run exactly instead): a model folder in diffusers layout with the same
    # architecture (e.g. sdstack/builtin/shapes-v1), or a text2image run / checkpoint folder (its EMA weights)
    init_from: str = ""


# ---------------------------------------------------------------------------------------------------- mapping

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    """`value` checked against the annotation `tp` (int, float, str, bool, tuple[...], nested dataclass)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config: [{where}] must be a table, got {type(value).__name__}", field=where)
        return from_dict(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config: {where} must be a list, got {value!r}", field=where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise UserError(f"config: {where} must have {len(args)} items, got {len(value)}", field=where)
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            try:
                return _coerce(value, a, where)
            except UserError:
                continue
        raise UserError(f"config: {where} has the wrong type: {value!r}", field=where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise UserError(f"config: {where} must be {_type_name(tp)}, got {value!r}", field=where)
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a dict; unknown keys and wrong types raise UserError naming the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise UserError(f"config: unknown key {key!r}; valid in {'[' + where + ']' if where else 'the top level'}: "
                        f"{', '.join(names)}", field=key)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for k, v in data.items():
        path = f"{where}.{k}" if where else k
        f = fields[k]
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) and f.default_factory is not dataclasses.MISSING:
            # a table given in part keeps the parent's own defaults for the rest (e.g. a fine-tune's [run])
            base = f.default_factory()
            values[k] = _merge(base, from_dict(hints[k], v, path), v)
        else:
            values[k] = _coerce(v, hints[k], path)
    return cls(**values)


def _merge(base, parsed, given: dict):
    """`base` with the keys present in `given` taken from `parsed` (nested tables merged the same way)."""
    updates = {}
    for k, v in given.items():
        new = getattr(parsed, k)
        old = getattr(base, k)
        updates[k] = _merge(old, new, v) if dataclasses.is_dataclass(old) and isinstance(v, dict) else new
    return dataclasses.replace(base, **updates)


def _check_choice(value, valid, where: str) -> None:
    if value not in valid:
        raise UserError(f"config: {where} must be one of {', '.join(map(str, valid))}, got {value!r}", field=where)


def validate(cfg) -> None:
    """Cross-field checks shared by both trainers; raises UserError with one line."""
    run, data = cfg.run, cfg.data
    _check_choice(run.mixed_precision, MIXED_PRECISIONS, "run.mixed_precision")
    _check_choice(data.source, DATA_SOURCES, "data.source")
    _check_choice(cfg.optim.decay, ("cosine", "linear", "constant"), "optim.decay")
    for name in ("max_steps", "batch_size", "grad_accum"):
        if getattr(run, name) < 1:
            raise UserError(f"config: run.{name} must be at least 1", field=f"run.{name}")
    if data.resolution % 8 or not 16 <= data.resolution <= 1024:
        raise UserError(f"config: data.resolution must be a multiple of 8 from 16 to 1024, got {data.resolution}",
                        field="data.resolution")
    if data.kind_weights:
        from ..data.shapes import check_kind_weights

        try:
            check_kind_weights(data.kind_weights)
        except UserError as e:
            raise UserError(f"config: data.{e}", field="data.kind_weights") from None
    from ..data.shapes import check_detail

    try:
        check_detail(data.detail_share, data.detail_widths)
    except UserError as e:
        raise UserError(f"config: data.{e}", field=f"data.{e.field}") from None
    if data.source == "folder" and not data.path:
        raise UserError("config: data.path is required when data.source = \"folder\"", field="data.path")
    if data.source == "folder" and not Path(data.path).is_dir():
        raise UserError(f"config: data folder not found: {data.path}", field="data.path")
    if isinstance(cfg, AutoencoderConfig):
        _check_denoise(cfg.loss)
    if isinstance(cfg, Text2ImageConfig):
        n = cfg.noise
        _check_choice(n.prediction_type, PREDICTION_TYPES, "noise.prediction_type")
        _check_choice(n.beta_schedule, BETA_SCHEDULES, "noise.beta_schedule")
        _check_choice(n.timestep_spacing, ("trailing", "leading", "linspace"), "noise.timestep_spacing")
        if n.zero_terminal_snr and n.prediction_type != "v_prediction":
            raise UserError("config: noise.zero_terminal_snr needs noise.prediction_type = \"v_prediction\"",
                            field="noise.zero_terminal_snr")
        _check_choice(cfg.vae_precision, MIXED_PRECISIONS, "vae_precision")
        _check_choice(cfg.unet.addition_embed_type, ("", "text"), "unet.addition_embed_type")
        if cfg.unet.addition_embed_type and cfg.unet.cross_attention_dim % cfg.unet.addition_embed_type_num_heads:
            raise UserError("config: unet.cross_attention_dim must be a multiple of "
                            "unet.addition_embed_type_num_heads", field="unet.addition_embed_type_num_heads")
        if not cfg.vae:
            raise UserError("config: vae (the trained autoencoder folder) is required", field="vae")


def _check_denoise(loss: AutoencoderLossConfig) -> None:
    if not 0.0 <= loss.denoise_share <= 1.0:
        raise UserError(f"config: loss.denoise_share must be from 0 to 1, got {loss.denoise_share}",
                        field="loss.denoise_share")
    if loss.denoise_share == 0:
        return
    if not loss.denoise_model:
        raise UserError("config: loss.denoise_share needs loss.denoise_model (a model folder)", field="loss.denoise_model")
    if loss.train_encoder:
        raise UserError("config: loss.denoise_share needs loss.train_encoder = false (the model was trained on the "
                        "frozen encoder's latents)", field="loss.train_encoder")
    lo, hi = loss.denoise_t
    if not 0 <= lo <= hi <= 999:
        raise UserError(f"config: loss.denoise_t must be [low, high] with 0 <= low <= high <= 999, got {[lo, hi]}",
                        field="loss.denoise_t")
    if not (Path(loss.denoise_model) / "model_index.json").is_file():
        raise UserError(f"config: loss.denoise_model: no model folder (model_index.json) at {loss.denoise_model}",
                        field="loss.denoise_model")


def load_config(path: str | Path, cls):
    """Read a TOML file onto `cls` (AutoencoderConfig or Text2ImageConfig) and validate it."""
    raw = read_toml(path, "config file", "config")
    cfg = from_dict(cls, raw)
    check = getattr(cfg, "check", None)  # a config class with its own checks (fine-tuning)
    check() if check else validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------- saving

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg) -> str:
    """The config as TOML (top-level scalars first, then one table per nested dataclass)."""
    d = dataclasses.asdict(cfg)
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
