"""Fine-tuning throughput with and without feature caching, and the memory peak of each fine-tune method.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_finetune.py                       # 40 steps, batch 4, 1 thread
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_finetune.py --steps 80 --rounds 3 --threads 2
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_finetune.py --tiny --steps 3 --mem-steps 2 --warmup 1  # smoke

Base model: --model PATH, else the built-in model (sdstack/builtin/shapes-v1), else (or with --tiny) a random
tiny SD1 model (`sdstack.models.tiny.tiny_bundle("sd1")`) written to a temp folder; the output says which.
Data: --data DIR, else `concept_dataset("ring", n=10, token="sks")` in a temp folder; textual inversion gets its
own set whose captions carry its new word (`concept_dataset("ring", token="zring")`).

Every run is `sdstack.train.finetune.finetune(cfg)` with cfg from `sdstack.train.cli.finetune_config` (what
`sdstack finetune <method>` runs), in a FRESH SUBPROCESS: Accelerate's state is process-wide, and a fresh process
makes the memory peak clean. Sampling, periodic checkpoints, logging and the progress bar are off; the run folder
and the feature cache (data.cache_dir) are in the temp folder; everything else is the config's default
(mixed_precision "auto", AdamW, lr 1e-4, LoRA rank 8, ...).

1. Throughput, LoRA: data.cache_latents + data.cache_text both true ("cached") against both false ("uncached"),
   same steps, batch size, threads, seed (so the same batches and noise). The caches are built by an earlier,
   untimed 1-step run, so the timed cached run only reads them (its cache hits/misses are printed). Each run
   trains --warmup + --steps steps; the step clock (a wrapper around the trainer's per-step reporter call)
   times only the last --steps, so first-step allocation, the end-of-run checkpoint and export are outside.
   --rounds repeats the cached/uncached pair, alternating, so a background load hits both alike.
     steady img/s   real images in the timed steps / their time (the ratio cached/uncached is of these)
     trainer img/s  the trainer's own summary (`images_per_second`: all steps, plus the final checkpoint write,
                    and it counts run.batch_size images for every step, also for a bucket's short last batch)
2. Memory: lora, dreambooth (prior preservation with --class-images class images, made by an untimed earlier
   run), textual_inversion (token "zring") and full, each --warmup + --mem-steps steps with caching on (the
   default), caches built beforehand. Peak RSS is the child's VmHWM (/proc/self/status; ru_maxrss as a check),
   shown next to the baseline: a process that only imports the trainer and loads the model. With CUDA the
   torch.cuda.max_memory_allocated peak is printed too.

Numbers are from this machine with whatever else runs on it; compare the ratio, not absolute img/s.
Exit status 1 if any run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("lora", "dreambooth", "textual_inversion", "full")
TI_TOKEN = "zring"
RESULT = "BENCH_RESULT "


# ------------------------------------------------------------------------------------------------ the child

def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _memory() -> dict:
    import resource

    out = {"hwm_kib": _proc_kib("VmHWM"), "rss_kib": _proc_kib("VmRSS"),
           "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    import torch

    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _instrument(info: dict) -> None:
    """Observe (never change) the run: a clock at every finished step, the real size of each training batch,
    and what the task cached and trains."""
    from sdstack.train import loop
    from sdstack.train.finetune import FinetuneTask

    info["steps"], info["batch_sizes"] = [], []
    update = loop._Reporter.update

    def timed_update(self, step, logs, lr, *rest):
        info["steps"].append((step, time.perf_counter()))
        return update(self, step, logs, lr, *rest)

    loop._Reporter.update = timed_update
    make_batch = FinetuneTask.make_batch

    def sized_make_batch(self, items, epoch, number, index=None, which=0):
        if index is None:  # a training batch (validation passes its own index)
            info["batch_sizes"].append(len(items))
        return make_batch(self, items, epoch, number, index=index, which=which)

    FinetuneTask.make_batch = sized_make_batch
    setup = FinetuneTask.setup

    def observed_setup(self, accelerator):
        info["mem_model_loaded"] = _memory()
        setup(self, accelerator)
        info["latents_cached"] = self._latent_keys is not None
        info["text_cached"] = self._text_keys is not None
        info["cache_hits"] = self.cache.hits if self.cache is not None else 0
        info["cache_misses"] = self.cache.misses if self.cache is not None else 0
        info["trainable"] = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        info["device"] = str(accelerator.device)

    FinetuneTask.setup = observed_setup


def child(spec: dict) -> dict:
    import logging

    import torch

    torch.set_num_threads(spec["threads"])
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    # everything a training run imports, in both modes, so the baseline holds the same libraries
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from sdstack.train.cli import finetune_config
    from sdstack.train.finetune import finetune

    if spec["mode"] == "load":
        from sdstack.models.loader import load_model

        after_import = _memory()
        bundle = load_model(spec["model"])
        return {"mem_import": after_import, "mem": _memory(), "family": bundle.family,
                "default_size": bundle.default_size,
                "params_m": sum(p.numel() for n in (bundle.unet, bundle.vae, *bundle.text_encoders)
                                for p in n.parameters()) / 1e6}
    info: dict = {}
    _instrument(info)
    cfg = finetune_config(spec["method"], None, None, spec["out"], spec["flags"], tuple(spec["sets"]))
    t0 = time.perf_counter()
    result = finetune(cfg)
    info["wall_s"] = time.perf_counter() - t0
    info["mem"] = _memory()
    info["trainer_ips"] = float(result["images_per_second"])
    info["loss"] = result["loss"]
    info["precision"] = cfg.run.mixed_precision
    info["batch_size"] = cfg.run.batch_size
    steps, sizes, w = info.pop("steps"), info.pop("batch_sizes"), spec["warmup"]
    if len(steps) != cfg.run.max_steps or len(sizes) != cfg.run.max_steps:
        raise RuntimeError(f"expected {cfg.run.max_steps} steps, saw {len(steps)} steps / {len(sizes)} batches")
    if w >= 1 and len(steps) > w:
        timed_images = sum(sizes[w:])
        info["timed_steps"], info["timed_images"] = len(steps) - w, timed_images
        info["steady_ips"] = timed_images / (steps[-1][1] - steps[w - 1][1])
    if not (info["loss"] is not None and info["loss"] == info["loss"]):
        raise RuntimeError(f"loss is {info['loss']}")
    return info


# ------------------------------------------------------------------------------------------------ the parent

class Runner:
    def __init__(self, args, work: Path, model: str):
        self.args, self.work, self.model = args, work, model
        self.n = 0

    def spawn(self, spec: dict, label: str) -> dict:
        spec = {"threads": self.args.threads, "warmup": self.args.warmup, **spec}
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(self.args.threads),
                   MKL_NUM_THREADS=str(self.args.threads), TOKENIZERS_PARALLELISM="false")
        print(f"  {label} ...", end="", flush=True)
        t = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                           text=True, env=env, cwd=ROOT)
        line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith(RESULT)), None)
        if p.returncode != 0 or line is None:
            print(" FAILED")
            tail = (p.stdout + p.stderr).strip().splitlines()[-40:]
            raise RuntimeError(f"{label}: child exited {p.returncode}:\n" + "\n".join(tail))
        print(f" {time.perf_counter() - t:.0f} s", flush=True)
        if self.args.verbose:
            print("\n".join("    | " + ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()))
        return json.loads(line[len(RESULT):])

    def train(self, method: str, label: str, steps: int, data: str, sets=(), **flags) -> dict:
        self.n += 1
        a = self.args
        out = self.work / "runs" / f"{self.n:02d}-{label}"
        base_sets = ["run.progress=false", "run.log_every=0", "run.sample_every=0", "run.checkpoint_every=0",
                     "run.checkpoint_minutes=0", f"run.threads={a.threads}",
                     f'data.cache_dir="{self.work / "cache"}"']
        if a.precision:
            base_sets.append(f'run.mixed_precision="{a.precision}"')
        flags = {"model": self.model, "data": data, "steps": steps, "batch_size": a.batch_size,
                 "seed": a.seed, **flags}
        return self.spawn({"mode": "train", "method": method, "out": str(out), "flags": flags,
                           "sets": base_sets + list(sets)}, label)


def resolve_model(args, work: Path) -> tuple[str, str]:
    if args.model:
        return args.model, "--model"
    if not args.tiny:
        from sdstack.models.registry import builtin_model_path

        builtin = builtin_model_path()
        if builtin is not None:
            return str(builtin), "the built-in model"
    import torch

    from sdstack.models.tiny import save_diffusers_folder, tiny_bundle

    torch.set_num_threads(args.threads)
    out = save_diffusers_folder(tiny_bundle("sd1"), work / "tiny-sd1")
    why = "--tiny" if args.tiny else "the built-in model sdstack/builtin/shapes-v1 is NOT installed"
    return str(out), f"a RANDOM TINY SD1 model (tiny_bundle('sd1'), {why}): a smoke test, not a real measurement"


def make_data(args, work: Path) -> tuple[str, str]:
    from sdstack.eval.concepts import concept_dataset

    ti = work / "data-zring"
    concept_dataset("ring", ti, n=args.images, token=TI_TOKEN, resolution=args.image_size)
    if args.data:
        return args.data, str(ti)
    main = work / "data-sks"
    concept_dataset("ring", main, n=args.images, token="sks", resolution=args.image_size)
    return str(main), str(ti)


def count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10**5 else f"{n / 1e3:.1f}K" if n >= 1000 else str(n)


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def fmt_cache(r: dict) -> str:
    parts = [x for x, on in (("latents", r["latents_cached"]), ("text", r["text_cached"])) if on]
    if not parts:
        return "none"
    return "+".join(parts) + f" ({r['cache_hits']} hits, {r['cache_misses']} computed)"


def throughput(runner: Runner, args, data: str) -> list[dict]:
    print("throughput: LoRA, cached vs uncached")
    on = ["data.cache_latents=true", "data.cache_text=true"]
    off = ["data.cache_latents=false", "data.cache_text=false"]
    runner.train("lora", "lora-cache-build", 1, data, on)  # untimed: fills the cache the timed runs read
    rows = []
    for r in range(args.rounds):
        for name, sets in (("cached", on), ("uncached", off)) if r % 2 == 0 else (("uncached", off),
                                                                                   ("cached", on)):
            res = runner.train("lora", f"lora-{name}-r{r + 1}", args.warmup + args.steps, data, sets)
            rows.append({"name": name, "round": r + 1, **res})
    return rows


def memory(runner: Runner, args, data: str, ti_data: str) -> list[dict]:
    print("memory: each method, caching on (the default)")
    class_dir = runner.work / "class_images"
    db = dict(class_prompt="a ring", num_class_images=args.class_images)
    db_sets = [f'dreambooth.class_dir="{class_dir}"', f"dreambooth.class_steps={args.class_steps}"]
    ti = dict(token=TI_TOKEN)
    extra = {"lora": ({}, [], data), "dreambooth": (db, db_sets, data), "textual_inversion": (ti, [], ti_data),
             "full": ({}, [], data)}
    rows = []
    for method in args.methods:
        flags, sets, d = extra[method]
        if method in ("dreambooth", "textual_inversion"):  # untimed: class images and this data's caches
            runner.train(method, f"{method}-prepare", 1, d, sets, **flags)
        res = runner.train(method, f"{method}-memory", args.warmup + args.mem_steps, d, sets, **flags)
        rows.append({"name": method, **res})
    return rows


def print_throughput(rows: list[dict], args, how: str) -> None:
    r0 = rows[0]
    if "TINY" in how:
        print("\n*** SMOKE TEST on a random tiny model: these numbers say nothing about real fine-tuning ***")
    print(f"\nLoRA throughput: batch {r0['batch_size']}, threads {args.threads}, precision {r0['precision']!r}, "
          f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.rounds} round(s)")
    head = (f"{'run':<10}{'round':>6}{'steady img/s':>14}{'trainer img/s':>15}{'wall s':>8}{'peak RSS MiB':>14}"
            f"  caches")
    print(head)
    print("-" * (len(head) + 30))
    for r in rows:
        print(f"{r['name']:<10}{r['round']:>6}{r['steady_ips']:>14.2f}{r['trainer_ips']:>15.2f}{r['wall_s']:>8.1f}"
              f"{mib(r['mem']['hwm_kib']):>14}  {fmt_cache(r)}")
    cached = [r["steady_ips"] for r in rows if r["name"] == "cached"]
    uncached = [r["steady_ips"] for r in rows if r["name"] == "uncached"]
    c, u = statistics.median(cached), statistics.median(uncached)
    print("steady img/s: real images of the timed steps / their time; trainer img/s: the trainer's summary "
          "(all steps, final checkpoint, run.batch_size per step)")
    print(f"\ncached {c:.2f} img/s, uncached {u:.2f} img/s (median of {len(cached)}): "
          f"cached/uncached = {c / u:.3f}")
    if args.rounds > 1:
        pairs = [a["steady_ips"] / b["steady_ips"] for a, b in
                 zip([r for r in rows if r["name"] == "cached"], [r for r in rows if r["name"] == "uncached"])]
        print(f"per-round ratios: {', '.join(f'{x:.3f}' for x in pairs)}")


def print_memory(rows: list[dict], base: dict, args) -> None:
    b = base["mem"]["hwm_kib"]
    cuda = any("cuda_peak_mib" in r["mem"] for r in rows)
    print(f"\nmemory peak per method: batch {rows[0]['batch_size']}, threads {args.threads}, "
          f"{args.warmup} warm-up + {args.mem_steps} timed steps, caching on")
    print(f"baseline: imports only {mib(base['mem_import']['hwm_kib'])} MiB; imports + model loaded "
          f"{mib(b)} MiB peak RSS ({base['family']}, {base['params_m']:.1f}M parameters, "
          f"native size {base['default_size']})")
    head = (f"{'method':<19}{'trains':>9}{'steady img/s':>14}{'trainer img/s':>15}{'peak RSS MiB':>14}"
            f"{'over base':>11}{'ru_maxrss':>11}" + (f"{'CUDA MiB':>10}" if cuda else "") + "  caches")
    print(head)
    print("-" * (len(head) + 30))
    for r in rows:
        m = r["mem"]
        print(f"{r['name']:<19}{count(r['trainable']):>9}{r.get('steady_ips', float('nan')):>14.2f}"
              f"{r['trainer_ips']:>15.2f}{mib(m['hwm_kib']):>14}{mib(m['hwm_kib'] - b):>11}{mib(m['maxrss_kib']):>11}"
              + (f"{m.get('cuda_peak_mib', 0):>10.0f}" if cuda else "") + f"  {fmt_cache(r)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model: diffusers folder or single file "
                                                   "[default: built-in shapes-v1, else a random tiny SD1 model]")
    ap.add_argument("--tiny", action="store_true", help="use a random tiny SD1 model (smoke test of this script)")
    ap.add_argument("--data", default=None, help="training image folder [default: concept_dataset('ring', token='sks')]")
    ap.add_argument("--images", type=int, default=10, help="images per generated data set")
    ap.add_argument("--image-size", type=int, default=64, help="size of the generated data set's images")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per throughput run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    ap.add_argument("--rounds", type=int, default=1, help="cached/uncached pairs, alternating order")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (run.threads)")
    ap.add_argument("--precision", choices=("auto", "no", "bf16"), default=None,
                    help="run.mixed_precision [default: the config's, 'auto']")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem-steps", type=int, default=5, help="timed steps per method in the memory table")
    ap.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS),
                    help="methods in the memory table (none: skip it)")
    ap.add_argument("--class-images", type=int, default=4, help="DreamBooth prior-preservation images")
    ap.add_argument("--class-steps", type=int, default=10, help="sampling steps per class image")
    ap.add_argument("--no-throughput", action="store_true", help="only the memory table")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (runs, caches, data)")
    ap.add_argument("--verbose", action="store_true", help="print each child's output")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(RESULT + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1 or args.mem_steps < 1 or args.batch_size < 1:
        ap.error("--steps, --warmup, --rounds, --mem-steps and --batch-size must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    try:
        model, how = resolve_model(args, work)
        data, ti_data = make_data(args, work)
        print(f"model: {how}: {model}")
        print(f"data: {data} ({'--data' if args.data else f'concept_dataset ring, {args.images} images, sks'}); "
              f"textual inversion: {ti_data} (token {TI_TOKEN!r})")
        runner = Runner(args, work, model)
        base = runner.spawn({"mode": "load", "model": model}, "baseline: load the model")
        t_rows = [] if args.no_throughput else throughput(runner, args, data)
        m_rows = memory(runner, args, data, ti_data) if args.methods else []
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if t_rows:
        print_throughput(t_rows, args, how)
    if m_rows:
        print_memory(m_rows, base, args)
    return 0


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
