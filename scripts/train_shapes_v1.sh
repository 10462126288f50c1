#!/usr/bin/env bash
# Reproduce the built-in model shapes-v1 from scratch, on a CPU, from the configs in configs/shapes-v1/:
#   1. autoencoder (AutoencoderKL, 4 latent channels, 64x64 -> 16x16), full 64x64 images, edge-weighted loss
#   2. its decoder trained further with the encoder frozen (stronger edge weight), then
#      once more with a gradient loss (small hexagons and stars keep their corners)
#   3. the round trip validated with the shapes oracle (>= 96% on every suite, else stop; see below)
#   4. text2image (UNet + CLIP text encoder from scratch; zero terminal SNR, v-prediction, min-SNR, EMA), in the
#      four stages the shipped model went through: one process (batch 32) to step 3104; two processes under
#      accelerate (16 each: the same 32 images a step, ~1.8x the images/s on two cores) to step 5500; then the
#      cosine schedule shortened from 12000 to 6500 steps: an anneal (lr 3.2e-4 drops to 8e-5, then falls to 5e-5);
#      then back to the 12000-step schedule (lr 2.6e-4 at step 6500) up to step 8500 (shipped until session 6)
#   5. two more runs from those weights at batch 256 (new optimizer and schedule each; see below), then two more
#      on fresh world images with a caption mix that leans towards relations and two-object prompts
#   6. export to sdstack/builtin/shapes-v1 as fp16 safetensors (later: new decoders, a trimmed vocabulary), then
#      score it with `sdstack eval`
# Every stage checkpoints; running the script again resumes where it stopped and skips finished stages.
#
#   scripts/train_shapes_v1.sh            (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUNS=runs/shapes-v1

resume() {  # "--resume RUN" when RUN has a checkpoint
  if [ -f "$1/checkpoints/latest" ]; then echo "--resume $1"; fi
}
step() {  # the step of RUN's latest checkpoint (0 when none)
  if [ -f "$1/checkpoints/latest" ]; then sed 's/^step-0*//; s/^$/0/' "$1/checkpoints/latest"; else echo 0; fi
}
TWO=(-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
     --dynamo_backend no -m sdstack)

if [ ! -f "$RUNS/ae/vae/config.json" ]; then
  "$PY" -m sdstack train autoencoder --config configs/shapes-v1/autoencoder.toml $(resume "$RUNS/ae")
fi
if [ ! -f "$RUNS/ae-decoder/vae/config.json" ]; then
  "$PY" -m sdstack train autoencoder --config configs/shapes-v1/autoencoder-decoder.toml $(resume "$RUNS/ae-decoder")
fi
if [ ! -f "$RUNS/ae-decoder2/vae/config.json" ]; then
  "$PY" -m sdstack train autoencoder --config configs/shapes-v1/autoencoder-decoder2.toml $(resume "$RUNS/ae-decoder2")
fi
# the UNet was trained on this stage-3 VAE (99.1 / 100 / 96.0 / 98.1 / 98.2% single, heldout, two-objects,
# counting, position); its decoder is replaced at the end (stages 5-6, steps 9-10)
"$PY" -m sdstack train check-vae "$RUNS/ae-decoder2/vae" --min-score 0.96
T2I=$RUNS/t2i-wide
if [ "$(step "$T2I")" -lt 8500 ]; then
  if [ "$(step "$T2I")" -lt 3104 ]; then
    "$PY" -m sdstack train text2image --config configs/shapes-v1/text2image.toml $(resume "$T2I") --stop-at 3104
  fi
  if [ "$(step "$T2I")" -lt 5500 ]; then
    OMP_NUM_THREADS=1 "$PY" "${TWO[@]}" train text2image --resume "$T2I" --set run.batch_size=16 \
      --set run.checkpoint_every=250 --stop-at 5500
  fi
  if [ "$(step "$T2I")" -lt 6500 ]; then
    OMP_NUM_THREADS=1 "$PY" "${TWO[@]}" train text2image --resume "$T2I" --set run.max_steps=6500
  fi
  # the schedule lengthened again to 12000 from the annealed step 6500 (lr back up to 2.6e-4, falling); the
  # shipped model is the EMA of step 8500 (4-seed eval: single 46% against 29% at step 6500)
  OMP_NUM_THREADS=1 "$PY" "${TWO[@]}" train text2image --resume "$T2I" --set run.max_steps=12000 --stop-at 8500
fi
# 5-6: two fresh cosine runs at a GPU-sized batch (256 images a step), each started from the fp16 export of the
# stage before (init_from: the weights only; a new AdamW and LR schedule). The shipped weights ran these two stages
# on a lent H200 GPU with scripts/gpu_continue_shapes.sh (7.6 and 1.9 minutes at 1600-1900 images/s; stage 5 was
# stopped by its wall-clock deadline at step 2485 of its 2561-step schedule). Here they run on what accelerate
# finds: on a 2-core CPU as two processes of 128 (about 6 and 2 hours at ~29 images/s; stages 7 and 8 about 7 and 5 hours more).
S4=$RUNS/model-8500
S5=$RUNS/t2i-b256
S6=$RUNS/t2i-b256-2
B256=(--config configs/shapes-v1/text2image.toml --set run.batch_size=128 --set optim.warmup_steps=200
      --set vae_precision=no --set run.sample_every=0 --set run.checkpoint_every=100)
if [ ! -f "$S4/model_index.json" ]; then
  "$PY" -m sdstack train export "$T2I" "$S4" --vae "$RUNS/ae-decoder2/vae" --fp16
fi
if [ "$(step "$S5")" -lt 2485 ]; then
  OMP_NUM_THREADS=1 "$PY" "${TWO[@]}" train text2image "${B256[@]}" --out "$S5" $(resume "$S5") \
    --set "vae=$S4/vae" --set "init_from=$S4" --set optim.lr=5e-4 --set run.max_steps=2561 --stop-at 2485
fi
if [ ! -f "$RUNS/model-b256/model_index.json" ]; then
  "$PY" -m sdstack train export "$S5" "$RUNS/model-b256" --vae "$S4/vae" --fp16
fi
if [ "$(step "$S6")" -lt 800 ]; then
  OMP_NUM_THREADS=1 "$PY" "${TWO[@]}" train text2image "${B256[@]}" --out "$S6" $(resume "$S6") \
    --set "vae=$S4/vae" --set "init_from=$RUNS/model-b256" --set optim.lr=2.5e-4 --set run.max_steps=800
fi
if [ ! -f "$RUNS/model-b256-2/model_index.json" ]; then
  "$PY" -m sdstack train export "$S6" "$RUNS/model-b256-2" --vae "$S4/vae" --fp16
fi
# 7-8 (session 7, on the H200 again: 5.7 and 4.9 minutes of training at 2108 and 1867 images/s): new world
# images (world seeds 1 and 2; the runs before saw seed 0's) and a caption mix of single 0.2, relation 0.35, counting 0.15,
# two 0.2, list 0.1 (the default is 0.3 / 0.2 / 0.2 / 0.15 / 0.15): relations went from 31% to 84% right.
# Stage 8 was stopped by its deadline at step 2142 of its 2400-step schedule.
S7=$RUNS/t2i-b256-3
S8=$RUNS/t2i-b256-4
MIX=(--set "data.kind_weights=[0.2, 0.35, 0.15, 0.2, 0.1]")
if [ "$(step "$S7")" -lt 2800 ]; then
  OMP_NUM_THREADS=1 "$PY" "${TWO[@]}" train text2image "${B256[@]}" "${MIX[@]}" --out "$S7" $(resume "$S7") \
    --set "vae=$S4/vae" --set "init_from=$RUNS/model-b256-2" --set optim.lr=3e-4 --set run.max_steps=2800 \
    --set data.world_seed=1
fi
if [ ! -f "$RUNS/model-b256-3/model_index.json" ]; then
  "$PY" -m sdstack train export "$S7" "$RUNS/model-b256-3" --vae "$S4/vae" --fp16
fi
if [ "$(step "$S8")" -lt 2142 ]; then
  OMP_NUM_THREADS=1 "$PY" "${TWO[@]}" train text2image "${B256[@]}" "${MIX[@]}" --out "$S8" $(resume "$S8") \
    --set "vae=$S4/vae" --set "init_from=$RUNS/model-b256-3" --set optim.lr=2e-4 --set run.max_steps=2400 \
    --set data.world_seed=2 --stop-at 2142
fi
"$PY" -m sdstack train export "$S8" sdstack/builtin/shapes-v1 --vae "$S4/vae" --fp16
# 9-10 (session 10, shipped): decoder stages 5 and 6 (encoder frozen, scale kept), trained on the latents the model
#    just exported samples (loss.denoise_*: its guided one-step estimates of noised encoder latents), then polished
#    with thin colour bands; the result replaces the model's decoder. On 1060 sampled latents it scores 0-2 points
#    above the stage-3 decoder on every suite (README). About 50 + 15 minutes on one CPU thread.
if [ ! -f "$RUNS/ae-decoder4/vae/config.json" ]; then
  "$PY" -m sdstack train autoencoder --config configs/shapes-v1/autoencoder-decoder4.toml $(resume "$RUNS/ae-decoder4")
fi
if [ ! -f "$RUNS/ae-decoder5/vae/config.json" ]; then
  "$PY" -m sdstack train autoencoder --config configs/shapes-v1/autoencoder-decoder5.toml $(resume "$RUNS/ae-decoder5")
fi
"$PY" scripts/ship_vae.py --vae "$RUNS/ae-decoder5/vae" --model sdstack/builtin/shapes-v1
# 11-12 (session 11, shipped): decoder stages 7 and 8, stage 6's recipe at a batch of 64 for 729 + 183 steps (run on
#    a GPU with scripts/gpu_decoder.sh; about 90 minutes on this CPU). The round trip of the fp32 result keeps >= 98%
#    on every suite (the fp16 copy shipped: counting 97.1%, one image) and outlines in 85% of images; sampled
#    latents decode as well as after stage 6 (README).
if [ ! -f "$RUNS/ae-decoder6/vae/config.json" ]; then
  "$PY" -m sdstack train autoencoder --config configs/shapes-v1/autoencoder-decoder6.toml $(resume "$RUNS/ae-decoder6")
fi
if [ ! -f "$RUNS/ae-decoder7/vae/config.json" ]; then
  "$PY" -m sdstack train autoencoder --config configs/shapes-v1/autoencoder-decoder7.toml $(resume "$RUNS/ae-decoder7")
fi
"$PY" scripts/ship_vae.py --vae "$RUNS/ae-decoder7/vae" --model sdstack/builtin/shapes-v1
"$PY" -m sdstack train check-vae sdstack/builtin/shapes-v1/vae --concept outline --min-score 0.95
# 13 (session 15, shipped): the text encoder's vocabulary trimmed to CLIP's first 10000 merges plus every word of the
#    shapes world (token table 12.6 -> 2.7 MB, the folder 33.7 -> 22.5 MB); the world's prompts tokenize and encode
#    bit for bit as before, so every image and eval figure stays the same. Running it again changes nothing.
"$PY" -m sdstack train trim-vocab sdstack/builtin/shapes-v1 sdstack/builtin/shapes-v1 --world
# (session 9, not shipped) decoder stage 4, configs/shapes-v1/autoencoder-decoder3.toml: thin colour bands only; its
# round trip passes 98% everywhere but it decodes sampled latents worse than stage 3 (README).
echo "shapes-v1 written to sdstack/builtin/shapes-v1"
"$PY" -m sdstack eval --model sdstack/builtin/shapes-v1 --seeds 4 --out "$RUNS/eval" || echo "(evaluation failed)"
