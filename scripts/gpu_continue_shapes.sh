#!/usr/bin/env bash
# Continue training the built-in model on a GPU for a fixed wall-clock budget (issue 3: what more training buys).
# The same trainer and config as scripts/train_shapes_v1.sh, started from the shipped weights (init_from: a fresh
# AdamW and cosine schedule) with a GPU-sized batch. A short probe run measures the speed first, so the cosine
# schedule is sized to end inside the budget (SIGINT at the deadline still leaves a checkpoint).
#
#   scripts/gpu_continue_shapes.sh SECONDS OUTDIR   (env: PY, BATCH, LR, WORKERS, INIT, VAE, RUN; STEPS skips the probe;
#     WORLD_SEED: fresh shapes-world images; KINDS: the caption-kind mix, e.g. "[0.2, 0.35, 0.15, 0.2, 0.1]")
#
# Writes OUTDIR/{unet.safetensors,text_encoder.safetensors} (fp16 EMA weights of the last checkpoint),
# metrics.jsonl, config.toml and the logs.
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${1:?seconds}
OUTDIR=${2:?output folder}
PY=${PY:-python3}
BATCH=${BATCH:-256}
LR=${LR:-5e-4}
WORKERS=${WORKERS:-12}
INIT=${INIT:-sdstack/builtin/shapes-v1}
VAE=${VAE:-sdstack/builtin/shapes-v1/vae}
RUN=${RUN:-/tmp/shapes-gpu}
mkdir -p "$OUTDIR"
left() { echo $((BUDGET - $(date +%s) + T0)); }

COMMON=(--config configs/shapes-v1/text2image.toml --set "vae=$VAE" --set "init_from=$INIT"
        --set "run.batch_size=$BATCH" --set "optim.lr=$LR" --set optim.warmup_steps=200
        --set "run.workers=$WORKERS" --set run.sample_every=0 --set run.checkpoint_every=0
        --set run.checkpoint_minutes=2 --set run.log_every=25 --set run.progress=true --set vae_precision=no
        --set "data.world_seed=${WORLD_SEED:-0}")
if [ -n "${KINDS:-}" ]; then COMMON+=(--set "data.kind_weights=$KINDS"); fi

rm -rf "$RUN" "$RUN-probe"
if [ -n "${STEPS:-}" ]; then  # known speed: no probe
  echo "training $STEPS steps, $(left) s left"
else
timeout -s INT 150 "$PY" -m sdstack train text2image "${COMMON[@]}" --out "$RUN-probe" \
  --set run.max_steps=100000 --stop-at 100 > "$OUTDIR/probe.log" 2>&1
echo "probe exit $? after $(( $(date +%s) - T0 )) s"
if [ ! -s "$RUN-probe/metrics.jsonl" ]; then tail -40 "$OUTDIR/probe.log"; exit 1; fi
# 75 s: start-up and the export after training; the first logged row (start-up) is left out
STEPS=$("$PY" scripts/probe_steps.py "$RUN-probe/metrics.jsonl" "$BATCH" "$(left)" 75 200 1)
echo "training $STEPS steps, $(left) s left"
fi
timeout -s INT $(( $(left) - 45 )) "$PY" -m sdstack train text2image "${COMMON[@]}" --out "$RUN" \
  --set run.max_steps="$STEPS" > "$OUTDIR/train.log" 2>&1
echo "train exit $? after $(( $(date +%s) - T0 )) s"
"$PY" -m sdstack train export "$RUN" "$RUN-model" --vae "$VAE" --fp16 > "$OUTDIR/export.log" 2>&1
echo "export exit $?"
cp "$RUN-model/unet/diffusion_pytorch_model.safetensors" "$OUTDIR/unet.safetensors"
cp "$RUN-model/text_encoder/model.safetensors" "$OUTDIR/text_encoder.safetensors"
cp "$RUN/metrics.jsonl" "$RUN/config.toml" "$OUTDIR/" 2>/dev/null
if [ -n "${SMOKE:-}" ]; then  # the engine on this device: one image from the new model
  timeout 90 "$PY" -m sdstack generate "a red star on a blue background" --model "$RUN-model" --device "$SMOKE" \
    --seed 1 --out "$OUTDIR/smoke.png" 2>&1 | tail -3
fi
tail -c 3000 "$OUTDIR/train.log" | tr '\r' '\n' | tail -5
ls -la "$OUTDIR"
