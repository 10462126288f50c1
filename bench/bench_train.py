"""Training throughput (images/s) of sdstack's two trainers on this machine, with the committed shapes-v1 configs.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py                      # both trainers, 30 steps each
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py --only text2image --steps 60 --rounds 3
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py --tiny --steps 2 --warmup 1   # smoke test

For each trainer (autoencoder: configs/shapes-v1/autoencoder.toml; text2image: configs/shapes-v1/text2image.toml)
the config is loaded as committed and overridden only where a benchmark must: the run folder is a temp folder,
run.threads = --threads, sampling / logging / progress / timed checkpoints are off, and the trainer's checkpoint
writes are switched off (see "Distortions" below). Batch size, precision, optimiser, EMA, data source (the shapes
world, rendered in the training process: run.workers = 0 as committed) and model size are the config's.

The text2image trainer needs a trained VAE folder: --vae PATH, else the built-in model's VAE
(sdstack/builtin/shapes-v1/vae) if installed, else a random VAE of the autoencoder config's architecture written
to a temp folder (the VAE's weights do not change the cost of a step, only its architecture does).

Measured per trainer, after --warmup untimed steps, in --rounds segments of --steps/--rounds steps each:
  trainer img/s   the `images_per_second` of the trainer's own summary (Trainer.run -> run_loop), per segment,
                  combined as total images / total time
  wall img/s      images / wall time around Trainer.run (includes the loop's set-up per segment)
  plain img/s     the baseline: a hand-written torch loop over the SAME Task.loss (same model, data batches,
                  noise, VAE encoding, tokenisation), plain torch.optim.AdamW + clip_grad_norm_ (+ an EMA by
                  torch._foreach_lerp_ where the config has one) and torch.autocast where the trainer uses bf16,
                  without Accelerate, the Trainer, its reporter, LR scheduler or step generators
  trainer/plain   the trainer's overhead as a ratio (1.0 = none; < 1 = the trainer is slower)
Segments alternate trainer / plain loop so a background load hits both alike. Also printed: the time to make
one batch of data (the shapes world is rendered in the training process) and one checkpoint write.

Distortions (why checkpoint writes are off): run_loop's end-of-run save runs before `images_per_second` is
computed, so it is inside the trainer's timer; for a 30-step run it would understate throughput. The loop's
own periodic saves are excluded (rep.pause) but the final one is not.

Exit status 1 if a run fails.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAINERS = ("autoencoder", "text2image")


# ------------------------------------------------------------------------------------------------ configs

def load_configs(args, work: Path):
    from sdstack.train.config import AutoencoderConfig, Text2ImageConfig, load_config

    ae = load_config(args.ae_config, AutoencoderConfig)
    t2i = load_config(args.t2i_config, Text2ImageConfig)
    if args.tiny:
        ae.model.block_out_channels, ae.model.norm_num_groups = (8, 16, 16), 8
        u, t = t2i.unet, t2i.text_encoder
        u.block_out_channels, u.layers_per_block, u.attention_head_dim = (16, 16, 32), 1, 2
        u.cross_attention_dim, u.norm_num_groups = 32, 8
        t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads = 32, 64, 1, 2
    for name, cfg in (("autoencoder", ae), ("text2image", t2i)):
        r = cfg.run
        r.out = str(work / name)
        r.threads = args.threads
        r.sample_every, r.log_every, r.progress = 0, 0, False
        r.checkpoint_every, r.checkpoint_minutes = 0, 0.0
        if hasattr(r, "validate_every"):
            r.validate_every = 0
        if args.batch_size:
            r.batch_size = args.batch_size
        r.max_steps = max(r.max_steps, args.warmup + args.steps + 1)  # the schedule as committed; never the end
    ae.init_from = ""  # stage 1 trains from scratch; a stage-2/3 config would name a run folder here
    return ae, t2i


def resolve_vae(args, ae_cfg, work: Path) -> tuple[str, str]:
    """(VAE folder, how it was chosen) for the text2image trainer."""
    from sdstack.models.registry import builtin_model_path

    if args.vae:
        return args.vae, "--vae"
    builtin = builtin_model_path()
    if builtin is not None and not args.tiny and (builtin / "vae" / "config.json").is_file():
        return str(builtin / "vae"), "built-in shapes-v1 VAE"
    from sdstack.train.autoencoder import build_vae

    torch.manual_seed(0)
    vae = build_vae(ae_cfg)
    vae.register_to_config(scaling_factor=1.0)
    out = work / "random-vae"
    vae.save_pretrained(out, safe_serialization=True)
    why = "--tiny" if args.tiny else "the built-in model is not installed"
    return str(out), f"random VAE of {args.ae_config}'s [model] architecture ({why})"


def make_task(kind: str, cfg):
    if kind == "autoencoder":
        from sdstack.train.autoencoder import AutoencoderTask

        return AutoencoderTask(cfg)
    from sdstack.train.text2image import Text2ImageTask

    return Text2ImageTask(cfg)


def reset_accelerate() -> None:
    """Accelerate keeps one process-wide state; the two trainers use different mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------------------------------------ the baseline

class PlainLoop:
    """The same Task.loss stepped by a hand-written torch loop (see the module docstring)."""

    def __init__(self, cfg, task, precision: str):
        self.cfg, self.task = cfg, task
        task.setup(types.SimpleNamespace(device=torch.device("cpu")))
        self.module = task.module.train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema.decay > 0 else None
        self.source = task.batch_source(cfg, 1, 0)   # the trainer's own batches, in the same order
        self.bf16 = precision == "bf16"
        self.step = 0
        self.items_per_step = self.source.items_per_step

    def run(self, steps: int) -> float:
        """Train `steps` steps; returns images/s."""
        accum = self.cfg.run.grad_accum
        t = time.perf_counter()
        loader = iter(self.source.loader(self.step, self.step + steps))
        for _ in range(steps):
            for micro in range(accum):
                batch = next(loader)
                g = torch.Generator().manual_seed(self.step * accum + micro)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                    loss, _ = self.task.loss(self.module, batch, g)
                (loss / accum).backward()
            if self.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(self.ema, self.params, 1 - self.cfg.ema.decay)
            self.step += 1
        return steps * self.items_per_step / (time.perf_counter() - t)


# ------------------------------------------------------------------------------------------------ measuring

def data_ms_per_batch(task, cfg, n: int = 3) -> float:
    """Milliseconds to make one (micro-)batch with the task's own batch source (no training)."""
    loader = iter(task.batch_source(cfg, 1, 0).loader(10**6, 10**6 + n))
    t = time.perf_counter()
    for _ in range(n * cfg.run.grad_accum):
        next(loader)
    return 1000 * (time.perf_counter() - t) / (n * cfg.run.grad_accum)


def bench_trainer(kind: str, cfg, args) -> dict:
    from sdstack.train.loop import Trainer, resolve_precision

    reset_accelerate()
    run_dir = Path(cfg.run.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, make_task(kind, cfg), run_dir)
    real_save = trainer.save
    trainer.save = lambda: None   # checkpoint writes off (module docstring: the final save is inside the timer)
    precision = trainer.precision
    plain = None if args.no_baseline else PlainLoop(cfg, make_task(kind, cfg), resolve_precision(
        cfg.run.mixed_precision))
    torch.set_num_threads(args.threads)

    trainer.run(stop_at=args.warmup)
    if plain is not None:
        plain.run(args.warmup)
    per_round = max(1, args.steps // args.rounds)
    items = trainer.source.items_per_step
    t_trainer = t_wall = t_plain = 0.0
    trainer_rates, plain_rates = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        result = trainer.run(stop_at=trainer.step + per_round)
        t_wall += time.perf_counter() - t0
        ips = float(result["images_per_second"])
        if not math.isfinite(result["loss"]):
            raise RuntimeError(f"{kind}: loss is {result['loss']}")
        trainer_rates.append(ips)
        t_trainer += per_round * items / ips
        if plain is not None:
            p_ips = plain.run(per_round)
            plain_rates.append(p_ips)
            t_plain += per_round * items / p_ips
    n_images = args.rounds * per_round * items
    t0 = time.perf_counter()
    real_save()
    save_s = time.perf_counter() - t0
    return {"trainer": kind, "batch": cfg.run.batch_size * cfg.run.grad_accum, "precision": precision,
            "steps": args.rounds * per_round, "trainer_ips": n_images / t_trainer, "wall_ips": n_images / t_wall,
            "plain_ips": n_images / t_plain if plain is not None else None,
            "trainer_rounds": trainer_rates, "plain_rounds": plain_rates,
            "data_ms": data_ms_per_batch(trainer.task, cfg), "save_s": save_s,
            "params_m": sum(p.numel() for p in trainer.task.module.parameters() if p.requires_grad) / 1e6}


def print_table(rows: list[dict], args) -> None:
    print(f"\ntraining throughput, threads={args.threads}, {args.warmup} warm-up steps, then "
          f"{args.rounds} round(s) of {max(1, args.steps // args.rounds)} steps"
          f"{' (TINY models: smoke test, not the shapes-v1 architecture)' if args.tiny else ''}")
    head = (f"{'trainer':<13}{'params':>8}{'batch':>7}{'precision':>11}{'steps':>7}{'trainer img/s':>15}"
            f"{'wall img/s':>12}{'plain img/s':>13}{'trainer/plain':>15}")
    print(head)
    print("-" * len(head))
    for r in rows:
        plain = f"{r['plain_ips']:>13.2f}{r['trainer_ips'] / r['plain_ips']:>15.3f}" if r["plain_ips"] else \
            f"{'-':>13}{'-':>15}"
        print(f"{r['trainer']:<13}{r['params_m']:>7.2f}M{r['batch']:>7}{r['precision']:>11}{r['steps']:>7}"
              f"{r['trainer_ips']:>15.2f}{r['wall_ips']:>12.2f}{plain}")
    print()
    for r in rows:
        spread = ""
        if len(r["trainer_rounds"]) > 1:
            spread = f"; per round trainer {', '.join(f'{x:.1f}' for x in r['trainer_rounds'])}"
            if r["plain_rounds"]:
                spread += f", plain {', '.join(f'{x:.1f}' for x in r['plain_rounds'])}"
        step_ms = 1000 * r["batch"] / r["trainer_ips"]
        print(f"{r['trainer']}: {step_ms:.0f} ms/step, of which data ~{r['data_ms']:.0f} ms/batch "
              f"(rendered in-process); one checkpoint write {r['save_s']:.2f} s (excluded){spread}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ae-config", default=str(ROOT / "configs/shapes-v1/autoencoder.toml"))
    ap.add_argument("--t2i-config", default=str(ROOT / "configs/shapes-v1/text2image.toml"))
    ap.add_argument("--only", choices=TRAINERS, default=None, help="run one trainer only")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per trainer (split over --rounds)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating trainer / plain-loop segments")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (trainer and plain loop each)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (overrides run.threads)")
    ap.add_argument("--batch-size", type=int, default=0, help="override run.batch_size (0 = the config's)")
    ap.add_argument("--vae", default=None, help="VAE folder for text2image [default: built-in shapes-v1 VAE, "
                                                "else a random one of the autoencoder config's architecture]")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain torch loop")
    ap.add_argument("--tiny", action="store_true", help="tiny models (smoke test of this script only)")
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.warmup < 1:
        ap.error("--steps, --rounds and --warmup must be at least 1")

    import logging

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        ae_cfg, t2i_cfg = load_configs(args, work)
        rows = []
        for kind in [args.only] if args.only else list(TRAINERS):
            cfg = ae_cfg if kind == "autoencoder" else t2i_cfg
            if kind == "text2image":
                t2i_cfg.vae, how = resolve_vae(args, ae_cfg, work)
                print(f"text2image VAE: {how}: {t2i_cfg.vae}")
            print(f"{kind}: config {args.ae_config if kind == 'autoencoder' else args.t2i_config}, "
                  f"batch {cfg.run.batch_size}, mixed_precision {cfg.run.mixed_precision!r}", flush=True)
            rows.append(bench_trainer(kind, cfg, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, args)
    return 0

if __name__ == "__main__":
    from _common import run_main

    run_main(main)
