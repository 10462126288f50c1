"""Fine-tune configs (`sdstack finetune lora|dreambooth|textual-inversion|full --config C.toml`): one typed
dataclass a TOML file maps onto strictly (unknown keys and wrong types are a one-line `UserError`), shared by
the four methods; each method reads its own table ([lora], [dreambooth], [textual_inversion]).

    method = "lora"
    model = ""                      # base model: a diffusers folder or a single-file checkpoint ("" = built-in)
    [run]                           # the same run table as `sdstack train` (steps, batch, checkpoints, threads)
    out = "runs/my-lora"
    max_steps = 400
    [data]
    train_data_dir = "data/ring"    # images + same-name .txt captions, or kohya N_name sub-folders
    [lora]
    rank = 8
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .config import EMAConfig, OptimConfig, RunConfig, _check_choice

METHODS = ("lora", "dreambooth", "textual_inversion", "full")
OPTIMIZERS = ("adamw", "adamw8bit")
# methods that take prior preservation ([dreambooth] class images; kohya's reg images): textual inversion trains
# only the new word's vectors, which a caption without the word never reaches
PRIOR_METHODS = ("lora", "dreambooth", "full")
# kohya's LoRA targets: the Linear layers (and 1x1 convs) of the UNet's transformer blocks and the text encoder's
# attention and MLP
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class FinetuneData:
    dataset: str = ""  # a kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]])
    train_data_dir: str = ""  # or one folder: images + captions, or kohya `N_name` sub-folders (N repeats)
    resolution: int = 0  # 0 = the model's native size
    caption_extension: str = ".txt"
    require_captions: bool = False  # images without a caption file are an error (else they train on the
    #                                 folder's class tokens, or on the empty caption)
    enable_bucket: bool = True
    min_bucket_reso: int = 0  # 0 = resolution / 2
    max_bucket_reso: int = 0  # 0 = resolution * 2
    bucket_reso_steps: int = 0  # 0 = 64, or 8 for models under 256 px
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False
    random_crop: bool = False
    validation_split: float = 0.0  # share of the images held out for the validation loss
    cache_latents: bool = True  # VAE latents cached on disk (needs flip_aug and random_crop off)
    cache_text: bool = True  # text-encoder outputs cached where captions are fixed and the encoder is frozen
    cache_dir: str = ""  # "" = <run out>/../cache (shared by runs in the same folder)


@dataclass
class FinetuneNoise:
    min_snr_gamma: float = 0.0  # 0 = plain MSE
    noise_offset: float = 0.0
    prediction_type: str = ""  # "" = the model's own
    # timesteps drawn uniformly from [min_timestep, max_timestep) (kohya's --min_timestep / --max_timestep): a style
    # of fine detail is drawn in the low-noise steps, a composition in the high-noise ones
    min_timestep: int = 0
    max_timestep: int = 1000
    # the prior-preservation (class / reg) images' upper bound; 0 = max_timestep. A concept taught only below
    # max_timestep still changes the text encoder's output at every step; the prior images kept on the whole range
    # hold ordinary prompts to the base model's drawing where the concept's images say nothing
    prior_max_timestep: int = 0


@dataclass
class LoraOptions:
    rank: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / rank (kohya's network_alpha)
    dropout: float = 0.0
    unet_targets: tuple[str, ...] = UNET_TARGETS
    train_text_encoder: bool = False
    text_targets: tuple[str, ...] = TEXT_TARGETS
    text_encoder_lr: float = 0.0  # 0 = the same as optim.lr
    # pivotal tuning (a textual_inversion.token given): the token's vectors go into the LoRA file as A1111's
    # `bundle_emb.*` keys (A1111 and Forge read them; diffusers' load_lora_weights refuses such a file) and, always,
    # into <run>/embeddings/<token>.safetensors (A1111's format; diffusers' load_textual_inversion reads it)
    bundle_embedding: bool = True


@dataclass
class DreamBoothOptions:
    instance_prompt: str = ""  # caption of instance images that have none, e.g. "a sks dog"
    # e.g. "a dog": prior-preservation images are generated from it by the base model; a list of prompts is taken
    # in turn (image i from prompt i mod n), a class of several kinds of thing
    class_prompt: str | tuple[str, ...] = ""
    num_class_images: int = 0  # 0 = no prior preservation (lora, dreambooth and full: kohya's reg images)
    prior_loss_weight: float = 1.0
    class_dir: str = ""  # "" = <run out>/class_images (reused when it already holds them)
    class_steps: int = 20
    class_cfg_scale: float = 7.0
    train_text_encoder: bool = False
    text_encoder_lr: float = 0.0  # the text encoder's learning rate (kohya's --learning_rate_te); 0 = optim.lr


def class_prompts(db: DreamBoothOptions) -> tuple[str, ...]:
    """The prior-preservation prompts: `class_prompt` as a tuple, blanks dropped."""
    p = db.class_prompt
    return tuple(x for x in ((p,) if isinstance(p, str) else p) if x.strip())


@dataclass
class TextualInversionOptions:
    token: str = ""  # the new word; also the embedding's file name, which is how prompts use it
    init_word: str = "*"  # the new vectors start from this word's token embeddings
    num_vectors: int = 1
    # after every step each vector whose norm exceeds this is scaled back to it (0 = no limit); the built-in model's
    # token rows have norms of 8.4-13.3, and unconstrained vectors grow to 18-40, far from any word it knows
    max_norm: float = 0.0
    # with lora, dreambooth or full, a token given here trains its vectors together with the model (pivotal tuning):
    # written as <run>/embeddings/<token>.safetensors, and in a LoRA file as `bundle_emb.<token>.*` keys (which A1111
    # reads); the text encoder's weights can then stay frozen, so every other word keeps its meaning
    lr: float = 0.0  # the vectors' learning rate when they train with another method; 0 = the same as optim.lr


@dataclass
class FinetuneSample:
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (1,)
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    negative_prompt: str = ""


@dataclass
class FinetuneConfig:
    method: str = "lora"
    model: str = ""  # base model ("" = the built-in model)
    vae: str = ""  # optional separate VAE
    output_name: str = ""  # file name of the result ("" = the run folder's name)
    clip_skip: int = 1
    gradient_checkpointing: bool = False
    train_text_encoder: bool = False  # full fine-tune: the text encoder(s) train too
    text_encoder_lr: float = 0.0  # full fine-tune: their learning rate (kohya's --learning_rate_te); 0 = optim.lr
    save_single_file: bool = True  # full / dreambooth: also an A1111 single-file .safetensors
    run: RunConfig = field(default_factory=lambda: RunConfig(batch_size=1, checkpoint_every=0, sample_every=0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0, decay="constant",
                                                                   weight_decay=0.01))
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decay=0.0))
    data: FinetuneData = field(default_factory=FinetuneData)
    noise: FinetuneNoise = field(default_factory=FinetuneNoise)
    lora: LoraOptions = field(default_factory=LoraOptions)
    dreambooth: DreamBoothOptions = field(default_factory=DreamBoothOptions)
    textual_inversion: TextualInversionOptions = field(default_factory=TextualInversionOptions)
    sample: FinetuneSample = field(default_factory=FinetuneSample)

    def check(self) -> None:
        """Cross-field checks before any model is loaded; UserError with one line."""
        _check_choice(self.method, METHODS, "method")
        _check_choice(self.run.mixed_precision, ("no", "bf16", "auto"), "run.mixed_precision")
        _check_choice(self.optim.decay, ("cosine", "linear", "constant"), "optim.decay")
        _check_choice(self.optim.optimizer, OPTIMIZERS, "optim.optimizer")
        if self.noise.prediction_type:
            _check_choice(self.noise.prediction_type, ("epsilon", "v_prediction"), "noise.prediction_type")
        if not 0 <= self.noise.min_timestep < self.noise.max_timestep:
            raise UserError(f"config: noise.min_timestep ({self.noise.min_timestep}) must be at least 0 and below "
                            f"noise.max_timestep ({self.noise.max_timestep})", field="noise.min_timestep")
        if self.noise.prior_max_timestep and self.noise.prior_max_timestep <= self.noise.min_timestep:
            raise UserError(f"config: noise.prior_max_timestep ({self.noise.prior_max_timestep}) must be above "
                            f"noise.min_timestep ({self.noise.min_timestep}), or 0", field="noise.prior_max_timestep")
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self.run, name) < 1:
                raise UserError(f"config: run.{name} must be at least 1", field=f"run.{name}")
        d = self.data
        if bool(d.dataset) == bool(d.train_data_dir):
            raise UserError("config: give exactly one of data.dataset (a dataset TOML) and data.train_data_dir "
                            "(an image folder)", field="data.train_data_dir")
        where = d.dataset or d.train_data_dir
        if d.train_data_dir and not Path(where).is_dir():
            raise UserError(f"config: data folder not found: {where}", field="data.train_data_dir")
        if d.dataset and not Path(where).is_file():
            raise UserError(f"config: dataset config not found: {where}", field="data.dataset")
        if d.resolution and (d.resolution % 8 or d.resolution < 16):
            raise UserError(f"config: data.resolution must be a multiple of 8 (at least 16), got {d.resolution}",
                            field="data.resolution")
        if not 0.0 <= d.validation_split < 1.0:
            raise UserError("config: data.validation_split must be in [0, 1)", field="data.validation_split")
        if self.method == "lora" and self.lora.rank < 1:
            raise UserError("config: lora.rank must be at least 1", field="lora.rank")
        if self.trains_embedding:
            ti = self.textual_inversion
            if not ti.token.strip() or any(c.isspace() for c in ti.token) or "," in ti.token:
                raise UserError("config: textual_inversion.token must be one new word (no spaces or commas), "
                                f"got {ti.token!r}", field="textual_inversion.token")
            if ti.num_vectors < 1:
                raise UserError("config: textual_inversion.num_vectors must be at least 1",
                                field="textual_inversion.num_vectors")
            if ti.max_norm < 0:
                raise UserError("config: textual_inversion.max_norm must be 0 (no limit) or more",
                                field="textual_inversion.max_norm")
        if self.method in PRIOR_METHODS:
            db = self.dreambooth
            if db.num_class_images < 0 or db.prior_loss_weight < 0:
                raise UserError("config: dreambooth.num_class_images and prior_loss_weight must not be negative",
                                field="dreambooth.num_class_images")
            if db.num_class_images and not class_prompts(db):
                raise UserError("config: dreambooth.class_prompt is required for prior preservation "
                                "(num_class_images > 0)", field="dreambooth.class_prompt")

    def ignored_settings(self) -> list[str]:
        """One line per setting the chosen method does not use (printed as a warning before training)."""
        if self.method not in PRIOR_METHODS and self.dreambooth.num_class_images > 0:
            return [f"warning: {self.method.replace('_', ' ')} takes no prior preservation (its vectors never see a "
                    f"caption without the word); dreambooth.num_class_images = {self.dreambooth.num_class_images} "
                    "and the class prompts are ignored"]
        return []

    @property
    def prior_preservation(self) -> bool:
        return self.method in PRIOR_METHODS and self.dreambooth.num_class_images > 0

    @property
    def trains_embedding(self) -> bool:
        """Whether new token vectors train: textual inversion, or another method given a token (pivotal tuning)."""
        return self.method == "textual_inversion" or bool(self.textual_inversion.token)

    @property
    def trains_text_encoder(self) -> bool:
        return {"lora": self.lora.train_text_encoder, "dreambooth": self.dreambooth.train_text_encoder,
                "full": self.train_text_encoder}.get(self.method, False)
