#!/usr/bin/env bash
# The session-3 and -4 text2image experiments on the shapes world (issue 3; results in its note), as overrides of
# configs/experiments/shapes-t2i-base.toml (the first shapes-v1 recipe; F became the shipped one). They ran with
# `vae = "runs/shapes-v1/ae/vae"`, which has the same encoder as the config's ae-decoder2 (so the same training
# latents; only the decoder of the in-training samples differs).
# One thread each; run two at a time at most on a 2-core machine.
#
#   configs/experiments/shapes-t2i.sh C|D|E|F|G|H|P  (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
T2I=(-m sdstack train text2image)
COMMON=(--config configs/experiments/shapes-t2i-base.toml --set run.sample_every=500 --set sample.eval_prompts=16)
case "${1:?which experiment: C D E F G H P}" in
  C) "$PY" "${T2I[@]}" "${COMMON[@]}" --out runs/exp/C --set text_encoder.token_embedding_std=0.3 ;;
  D) "$PY" "${T2I[@]}" "${COMMON[@]}" --out runs/exp/D --set text_encoder.token_embedding_std=1.0 ;;
  E) "$PY" "${T2I[@]}" "${COMMON[@]}" --out runs/exp/E --set text_encoder.token_embedding_std=1.0 \
       --set noise.min_snr_gamma=0.0 ;;   # D without min-SNR weighting
  F) "$PY" "${T2I[@]}" "${COMMON[@]}" --out runs/exp/F --set text_encoder.token_embedding_std=1.0 \
       --set "unet.block_out_channels=[48, 96, 128]" ;;   # D with a wider UNet (6.4M parameters)
  G) # anneal of the shapes-v1 run from its step-6865 checkpoint to step 8000 (lr ~5e-5 -> 2.5e-5)
     mkdir -p runs/exp/G && cp -an runs/shapes-v1/t2i/checkpoints runs/exp/G/
     "$PY" "${T2I[@]}" --resume runs/exp/G --out runs/exp/G --set run.max_steps=8000 \
       --set optim.min_lr_ratio=0.05 --set run.sample_every=500 ;;
  H) # G without min-SNR weighting (more weight on the low-noise steps that finish shapes)
     mkdir -p runs/exp/H && cp -an runs/shapes-v1/t2i/checkpoints runs/exp/H/
     "$PY" "${T2I[@]}" --resume runs/exp/H --out runs/exp/H --set run.max_steps=8000 \
       --set optim.min_lr_ratio=0.05 --set run.sample_every=500 --set noise.min_snr_gamma=0.0 ;;
  P) # session 5: the shipped recipe (F) plus the attention-pooled prompt added to the UNet's timestep embedding;
     # same seed and data order as F, compared with F at step 1707
     "$PY" "${T2I[@]}" --config configs/shapes-v1/text2image.toml --out runs/exp/P --set vae=runs/shapes-v1/ae/vae \
       --set unet.addition_embed_type=text --stop-at 1707 ;;
  *) echo "unknown experiment $1 (C D E F G H P)" >&2; exit 2 ;;
esac
