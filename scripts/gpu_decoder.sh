#!/usr/bin/env bash
# Refine the built-in model's decoder on a GPU for a fixed wall-clock budget (issue 3: the VAE round trip and the
# decoding of sampled latents). Several variants of configs/shapes-v1/autoencoder-decoder5.toml (stage 6, the shipped
# decoder's recipe) train side by side from INIT, each a "name:denoise_share:lr" triple; a short probe of all of
# them together measures the speed, so each cosine schedule is sized to end inside the budget.
#
#   scripts/gpu_decoder.sh SECONDS OUTDIR VARIANT...    (env: PY, BATCH, WORKERS per variant, INIT, MODEL, RUN)
#   e.g. scripts/gpu_decoder.sh 480 /tmp/dec r20:0.2:1e-4 r40:0.4:1e-4
#
# Writes OUTDIR/<name>.tar: the VAE folder (vae/), the run's log and metrics.jsonl.
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${1:?seconds}
OUTDIR=${2:?output folder}
shift 2
PY=${PY:-python3}
BATCH=${BATCH:-64}
WORKERS=${WORKERS:-6}
INIT=${INIT:-runs/shapes-v1/ae-decoder4c/vae}
MODEL=${MODEL:-sdstack/builtin/shapes-v1}
RUN=${RUN:-/tmp/dec-gpu}
PROBE=${PROBE:-40}
mkdir -p "$OUTDIR" "$RUN"
left() { echo $((BUDGET - $(date +%s) + T0)); }

args() {  # name share lr -> the trainer's arguments
  echo --config configs/shapes-v1/autoencoder-decoder5.toml --set "init_from=$INIT" --set "loss.denoise_model=$MODEL" \
    --set "loss.denoise_share=$2" --set "optim.lr=$3" --set "run.batch_size=$BATCH" --set "run.workers=$WORKERS" \
    --set run.threads=2 --set run.checkpoint_every=0 --set run.checkpoint_minutes=2 --set run.log_every=20 \
    --set run.progress=false --set optim.warmup_steps=50
}

# probe: every variant at once (as they will run), PROBE steps
for v in "$@"; do
  IFS=: read -r name share lr <<<"$v"
  rm -rf "$RUN/probe-$name"
  timeout -s INT 150 "$PY" -m sdstack train autoencoder $(args "$name" "$share" "$lr") --out "$RUN/probe-$name" \
    --set run.max_steps=100000 --stop-at "$PROBE" > "$RUN/probe-$name.log" 2>&1 &
done
wait
echo "probes done after $(( $(date +%s) - T0 )) s"
first=${1%%:*}
if [ ! -s "$RUN/probe-$first/metrics.jsonl" ]; then tail -30 "$RUN/probe-$first.log"; exit 1; fi
# 60 s: start-up and the export after training
STEPS=$("$PY" scripts/probe_steps.py "$RUN/probe-$first/metrics.jsonl" "$BATCH" "$(left)" 60 50)
echo "training $STEPS steps per variant, $(left) s left"
for v in "$@"; do
  IFS=: read -r name share lr <<<"$v"
  rm -rf "$RUN/$name"; mkdir -p "$RUN/$name"
  timeout -s INT $(( $(left) - 20 )) "$PY" -m sdstack train autoencoder $(args "$name" "$share" "$lr") \
    --out "$RUN/$name" --set run.max_steps="$STEPS" > "$RUN/$name/train.log" 2>&1 &
done
wait
echo "training done after $(( $(date +%s) - T0 )) s"
for v in "$@"; do
  IFS=: read -r name share lr <<<"$v"
  tail -c 400 "$RUN/$name/train.log" | tr '\r' '\n' | tail -3
  if [ ! -f "$RUN/$name/vae/diffusion_pytorch_model.safetensors" ]; then  # stopped early: export its last checkpoint
    last=$(ls "$RUN/$name/checkpoints" 2>/dev/null | grep -o '[0-9]*$' | sort -n | tail -1)
    echo "$name: stopped before max_steps; exporting step ${last:-none}"
    [ -n "$last" ] && timeout 60 "$PY" -m sdstack train autoencoder --resume "$RUN/$name" --out "$RUN/$name" \
      --set run.max_steps=$((10#$last)) > "$RUN/$name/export.log" 2>&1
  fi
  tar -C "$RUN/$name" -cf "$OUTDIR/$name.tar" train.log metrics.jsonl $(cd "$RUN/$name" && ls -d vae 2>/dev/null)
done
ls -la "$OUTDIR"
