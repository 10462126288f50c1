#!/usr/bin/env bash
# Try several fine-tune recipes of the issue-5 proof side by side on a GPU (each one a scripts/finetune_proof.py run:
# training, the concept eval and the single-suite eval, all on the GPU), for a wall-clock budget. The recipe that
# wins is then run on the CPU for the proof's own numbers (its training time and images/s are the CPU's).
#
#   scripts/gpu_finetune_sweep.sh SECONDS OUTDIR VARIANT...     (env: PY, SEEDS=2, PARALLEL=4, DEVICE=cuda,
#                                                                EXTRA: more finetune_proof.py flags for every run)
#   VARIANT = name;method;concept[;KEY=VALUE|--proof-flag=VALUE]...
#   e.g. scripts/gpu_finetune_sweep.sh 420 /tmp/sweep "te;lora;outline;lora.train_text_encoder=true" \
#        "te-r10;lora;outline;lora.train_text_encoder=true;--repeats=10"
#
# Measured on one H200 (session 12): a single text-encoder LoRA run of the proof trains at 38.7 images/s there (the
# tiny model is bound by kernel launches: 3.5x one thread of the 2-core CPU), and its 50 class images are drawn on
# the host CPU before training. Sixteen variants at once did not get through their class images in 400 s, so the
# default is 4 at a time; for more, share pre-drawn class images (`--set dreambooth.class_dir=DIR`).
#
# First a smoke run (10 steps, 2 prompts) stops the script with the log's tail if the GPU path fails; then the base
# model's evals run once and every variant starts from a copy of them. Writes OUTDIR/results.tar.gz: each variant's
# proof.md / proof.json, eval summaries and contact sheets, and the logs.
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${1:?seconds}
OUTDIR=${2:?output folder}
shift 2
PY=${PY:-python3}
SEEDS=${SEEDS:-2}
PARALLEL=${PARALLEL:-4}
DEVICE=${DEVICE:-cuda}
read -r -a EXTRA <<<"${EXTRA:-}"
R=${RUN:-/tmp/ft-sweep}
mkdir -p "$OUTDIR" "$R"
left() { echo $((BUDGET - $(date +%s) + T0)); }
proof() { "$PY" scripts/finetune_proof.py --device "$DEVICE" --seeds "$SEEDS" "$@" "${EXTRA[@]}"; }

if ! proof --methods lora --concepts outline --limit 2 --single-limit 2 --set run.max_steps=10 --out "$R/smoke" \
    > "$R/smoke.log" 2>&1; then
  tail -40 "$R/smoke.log"; for f in "$R"/smoke/logs/*.log; do echo "== $f"; tail -15 "$f"; done; exit 1
fi
echo "smoke run passed after $(( $(date +%s) - T0 )) s"
proof --base-only --concepts ring,outline --out "$R/base" > "$R/base.log" 2>&1 || { tail -30 "$R/base.log"; exit 1; }
echo "base evals done after $(( $(date +%s) - T0 )) s"

n=0
for v in "$@"; do
  IFS=';' read -r -a f <<<"$v"
  name=${f[0]}; method=${f[1]}; concept=${f[2]}
  args=()
  for item in "${f[@]:3}"; do
    if [[ $item == --* ]]; then args+=("${item%%=*}" "${item#*=}"); else args+=(--set "$item"); fi
  done
  rm -rf "${R:?}/$name"; cp -r "$R/base" "$R/$name"; rm -f "$R/$name"/proof.*
  timeout -s KILL $(( $(left) - 25 )) "$PY" scripts/finetune_proof.py --device "$DEVICE" --seeds "$SEEDS" "${EXTRA[@]}" \
    --methods "$method" --concepts "$concept" --tag "$name" --out "$R/$name" "${args[@]}" > "$R/$name.log" 2>&1 &
  n=$((n + 1))
  if (( n % PARALLEL == 0 )); then wait; fi
done
wait
echo "variants done after $(( $(date +%s) - T0 )) s"
for v in "$@"; do
  name=${v%%;*}
  if [ -f "$R/$name/proof.md" ]; then tail -n 1 "$R/$name/proof.md"; else echo "$name: no result"; tail -5 "$R/$name.log"; fi
done
cd "$R" && tar -czf "$OUTDIR/results.tar.gz" --exclude='./*/runs' --exclude='./*/data' --exclude='./*/eval/base*' \
  --exclude='./smoke' --exclude='./base' ./*.log ./*/
ls -la "$OUTDIR"
