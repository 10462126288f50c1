"""The shared training loop on Accelerate: deterministic batches and noise per step, gradient accumulation,
AdamW with warm-up and cosine decay, EMA, bf16 autocast, atomic checkpoints with exact resume, sample grids and
loss curves, a progress bar. A `Task` (autoencoder.py, text2image.py) supplies the model and the loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import torch

from ..errors import UserError
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import to_toml
from .data import BatchPlan, TrainingImages, batch_loader
from .ema import EMA
from .plots import loss_curve, save_png


class Task:
    """What a trainer plugs into `train`: `module` (one nn.Module holding every trained network, whose forward is
    what DDP wraps), `loss(model, batch, generator)`, `samples(step, run_dir)` and `export(run_dir)`."""

    module: torch.nn.Module

    def loss(self, model, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def samples(self, step: int, run_dir: Path) -> dict:
        return {}

    def export(self, run_dir: Path) -> Path | None:
        return None

    def setup(self, accelerator) -> None:
        """Move frozen helpers (e.g. a VAE) to the device once the accelerator exists."""

    def batch_source(self, cfg, world: int, rank: int):
        """The batches to train on (see `ImageBatches`); the default reads `cfg.data` (shapes world or folder)."""
        return ImageBatches(cfg, world, rank)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups (one group of every trainable parameter at `lr` by default)."""
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr": lr}]

    def checkpoint_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the module (all of it; a fine-tune stores only what trains)."""
        return module.state_dict()

    def load_checkpoint_weights(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        module.load_state_dict(weights, strict=True)

    def after_step(self) -> None:
        """Called after each optimizer step (e.g. to project trained weights back onto a constraint)."""


class ImageBatches:
    """Batches of `TrainingImages` (shapes world or image folder) in the deterministic order of a `BatchPlan`.
    Any batch source has `summary`, `items_per_step`, `epoch(step)` and `loader(start, end)`."""

    def __init__(self, cfg, world: int, rank: int):
        self.data = TrainingImages(cfg.data)
        self.plan = BatchPlan(self.data.size, cfg.run.batch_size, cfg.run.grad_accum, world, rank, cfg.run.seed)
        self.summary, self.items_per_step = self.data.summary, self.plan.items_per_step
        self.workers, self.flip = cfg.run.workers, cfg.data.random_flip

    def epoch(self, step: int) -> int:
        return self.plan.epoch(step)

    def loader(self, start: int, end: int):
        return batch_loader(self.data, self.plan, start, end, self.workers, self.flip)


def resolve_precision(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if cpu_bf16 or amx else "no"


def make_optimizer(groups: list[dict], o):
    """AdamW (torch) or 8-bit AdamW (bitsandbytes, an optional dependency) over `groups`."""
    if getattr(o, "optimizer", "adamw") == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optim.optimizer = \"adamw8bit\" needs bitsandbytes (pip install 'sdstack[8bit]')",
                            field="optim.optimizer") from None
        return bnb.optim.AdamW8bit(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)


def lr_factor(step: int, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine or linear down to `min_ratio` at `total` (or
    constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "linear":
        return 1.0 - (1 - min_ratio) * progress
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (network initialisation draws from them)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The noise source of one micro-batch: a pure function of (seed, step, micro, rank)."""
    value = random.Random(f"sdstack-train:{seed}:{step}:{micro}:{rank}").getrandbits(63)
    return torch.Generator().manual_seed(value)


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint at the end of the current step and stops."""

    def __init__(self):
        self.set, self._old = False, {}

    def __enter__(self):
        if sys.platform != "win32":
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, *_):
        self.set = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, cfg, task: Task, run_dir: Path):
        from accelerate import Accelerator

        self.cfg, self.task, self.run_dir = cfg, task, run_dir
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        self.precision = resolve_precision(cfg.run.mixed_precision)
        # cpu=True without CUDA: under a multi-process launch accelerate then runs MULTI_CPU (gloo) instead of
        # silently starting independent single-process runs
        self.acc = Accelerator(mixed_precision=self.precision, cpu=not torch.cuda.is_available())
        self.source = task.batch_source(cfg, self.acc.num_processes, self.acc.process_index)
        trainable = [p for p in task.module.parameters() if p.requires_grad]
        o = cfg.optim
        optimizer = make_optimizer(task.param_groups(o.lr), o)
        self.model, self.optimizer = self.acc.prepare(task.module, optimizer)
        self.params = trainable
        # stepped once per optimizer step by us (not prepared: a prepared scheduler steps once per process)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
            lambda s: lr_factor(s, o.warmup_steps, cfg.run.max_steps, o.decay, o.min_lr_ratio))
        named = {k: p for k, p in self.acc.unwrap_model(self.model).named_parameters() if p.requires_grad}
        self.ema = EMA(named, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay > 0 else None
        task.setup(self.acc)
        self.step, self.history = 0, []

    # ------------------------------------------------------------------------------------------ state

    def state(self) -> dict:
        unwrapped = self.acc.unwrap_model(self.model)
        return {"step": self.step, "epoch": self.source.epoch(self.step),
                "model": {k: v.detach().cpu() for k, v in self.task.checkpoint_weights(unwrapped).items()},
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "rng": rng_state(),
                "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 2)}

    def load_state(self, state: dict) -> None:
        self.task.load_checkpoint_weights(self.acc.unwrap_model(self.model), state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise UserError("the checkpoint has no EMA weights but the config asks for EMA", field="ema.decay")
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = [(int(s), float(v)) for s, v in state["history"].tolist()]

    def save(self) -> Path | None:
        self.acc.wait_for_everyone()
        path = None
        if self.acc.is_main_process:
            path = save_checkpoint(self.run_dir, self.state(), to_toml(self.cfg), step=self.step,
                                   keep=self.cfg.run.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------------------------------ steps

    def train_step(self, micro_batches: list[dict]) -> dict:
        self.model.train()
        accum, totals = len(micro_batches), {}
        for micro, batch in enumerate(micro_batches):
            g = step_generator(self.cfg.run.seed, self.step, micro, self.acc.process_index)
            sync = micro == accum - 1
            with contextlib.nullcontext() if sync else self.acc.no_sync(self.model):
                with self.acc.autocast():
                    loss, logs = self.task.loss(self.model, batch, g)
                self.acc.backward(loss / accum)
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        if self.cfg.optim.grad_clip > 0:
            self.acc.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.task.after_step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return totals

    def _mean_loss(self, value: float) -> float:
        if self.acc.num_processes == 1:
            return value
        t = torch.tensor([value], device=self.acc.device)
        return float(self.acc.reduce(t, "mean"))

    def _agree(self, loss: float, stop: bool, timed: bool) -> tuple[float, bool, bool]:
        """One collective per step: the loss averaged over processes, and whether ANY process was asked to stop
        (Ctrl-C / SIGTERM reach the ranks at different moments) or is due a timed checkpoint, so that every
        rank saves and stops at the same step."""
        if self.acc.num_processes == 1:
            return loss, stop, timed
        t = torch.tensor([loss, float(stop), float(timed)], dtype=torch.float64, device=self.acc.device)
        total = self.acc.reduce(t, "sum")
        return float(total[0]) / self.acc.num_processes, bool(total[1] > 0), bool(total[2] > 0)

    def write_outputs(self) -> dict:
        """Sample grid (with EMA weights) and loss curve; main process only."""
        info = {}
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            with self.ema.applied() if self.ema else contextlib.nullcontext():
                info = self.task.samples(self.step, self.run_dir) or {}
            save_png(loss_curve(self.history), self.run_dir / "loss.png")
        self.acc.wait_for_everyone()
        return info

    def validation_loss(self) -> float | None:
        """Mean loss on the task's held-out batches (fixed noise), averaged over processes; None without any."""
        fn = getattr(self.task, "validation_loss", None)
        if fn is None:
            return None
        self.model.eval()
        try:
            with torch.no_grad(), self.acc.autocast():
                value = fn(self.model)
        finally:
            self.model.train()
        return None if value is None else self._mean_loss(value)

    def export(self) -> Path | None:
        self.acc.wait_for_everyone()
        out = None
        if self.acc.is_main_process:
            with self.ema.applied() if self.ema else contextlib.nullcontext():
                out = self.task.export(self.run_dir)
        self.acc.wait_for_everyone()
        return out

    def run(self, stop_at: int | None = None) -> dict:
        return run_loop(self, stop_at)


class _Reporter:
    """Progress bar on a terminal, plain log lines otherwise, and metrics.jsonl."""

    def __init__(self, trainer: Trainer, start: int, end: int):
        self.t, self.main = trainer, trainer.acc.is_main_process
        self.items = trainer.source.items_per_step
        self.bar = None
        if self.main and trainer.cfg.run.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.cfg.run.max_steps, initial=start, unit="step", dynamic_ncols=True)
        self.t0, self.s0, self.end = time.time(), start, end
        self.images = 0  # counted from the batches (bucketed data has short batches)
        self.paused = 0.0  # seconds spent on samples and checkpoints, left out of images/s
        self.metrics = trainer.run_dir / "metrics.jsonl" if self.main else None

    def images_per_second(self, step: int) -> float:
        return self.images / max(1e-9, time.time() - self.t0 - self.paused)

    @contextlib.contextmanager
    def pause(self):
        t = time.time()
        try:
            yield
        finally:
            self.paused += time.time() - t

    def update(self, step: int, logs: dict, lr: float, images: int | None = None) -> None:
        self.images += self.items if images is None else images
        if not self.main:
            return
        ips = self.images_per_second(step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{ips:.1f}", refresh=False)
        every = self.t.cfg.run.log_every
        if every and (step % every == 0 or step == self.end):
            row = {"step": step, **{k: round(v, 6) for k, v in logs.items()}, "lr": lr, "img_s": round(ips, 2)}
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.bar is None and self.t.cfg.run.progress:
                eta = (self.t.cfg.run.max_steps - step) * self.items / max(ips, 1e-9)
                print(f"step {step}/{self.t.cfg.run.max_steps} loss {logs['loss']:.5f} lr {lr:.2e} "
                      f"img/s {ips:.1f} eta {eta / 60:.0f} min", flush=True)

    def validation(self, step: int, value: float) -> None:
        if self.main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps({"step": step, "val_loss": round(value, 6)}) + "\n")
            self.note(f"step {step}: validation loss {value:.5f}")

    def note(self, text: str) -> None:
        if self.main:
            (self.bar.write if self.bar is not None else lambda s: print(s, flush=True))(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_loop(t: Trainer, stop_at: int | None) -> dict:
    cfg = t.cfg.run
    end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
    start = t.step
    loader = t.source.loader(start, end)
    rep = _Reporter(t, start, end)
    rep.note(f"training {type(t.task).__name__} from step {start} to {end} of {cfg.max_steps} "
             f"({t.acc.num_processes} process(es), precision {t.precision}, data {t.source.summary})")
    last_save, stopped = time.time(), False
    pending: list[dict] = []
    with _StopFlag() as flag:
        for batch in loader:
            pending.append(batch)
            if len(pending) < cfg.grad_accum:
                continue
            images = sum(len(b["captions"]) for b in pending) * t.acc.num_processes
            logs = t.train_step(pending)
            pending = []
            t.step += 1
            timed = cfg.checkpoint_minutes > 0 and time.time() - last_save > 60 * cfg.checkpoint_minutes
            logs["loss"], stopped, timed = t._agree(logs["loss"], flag.set, timed)
            t.history.append((t.step, logs["loss"]))
            rep.update(t.step, logs, t.scheduler.get_last_lr()[0], images)
            if not math.isfinite(logs["loss"]):
                raise RuntimeError(f"loss became {logs['loss']} at step {t.step}")
            validate_every = getattr(cfg, "validate_every", 0)
            if validate_every and t.step % validate_every == 0:
                with rep.pause():
                    value = t.validation_loss()
                if value is not None:
                    rep.validation(t.step, value)
            if cfg.sample_every and t.step % cfg.sample_every == 0:
                with rep.pause():
                    info = t.write_outputs()
                if info:
                    rep.note(f"step {t.step}: " + ", ".join(f"{k} {v}" for k, v in info.items()))
            if (cfg.checkpoint_every and t.step % cfg.checkpoint_every == 0) or timed or stopped:
                with rep.pause():
                    path = t.save()
                last_save = time.time()
                rep.note(f"checkpoint {path}" if path else "")
            if stopped:
                break
    ips = rep.images_per_second(t.step)  # before the final save: only training time counts
    if not stopped and (not cfg.checkpoint_every or t.step % cfg.checkpoint_every):
        t.save()
    result = {"step": t.step, "images_per_second": ips,
              "loss": t.history[-1][1] if t.history else None, "stopped": stopped,
              "main_process": t.acc.is_main_process}
    if t.step >= cfg.max_steps and not stopped:
        if cfg.sample_every and t.step % cfg.sample_every:
            t.write_outputs()
        result["model"] = t.export()
    rep.close()
    return result


def train(cfg, task: Task, *, resume: str | Path | None = None, stop_at: int | None = None) -> dict:
    """Train `task` per `cfg`, optionally resuming from a checkpoint (or run folder); returns a summary."""
    run_dir = Path(cfg.run.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, task, run_dir)
    if resume is not None:
        trainer.load_state(load_checkpoint(resume))
    if trainer.acc.is_main_process:
        (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    return trainer.run(stop_at)
