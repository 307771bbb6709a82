#!/usr/bin/env bash
# The whole CPU quick start on the built-in shapes: pretrain an EC-DiT, post-train it with
# SharpMoE, and run both controls (same steps; same compute). README gives times and numbers.
# Settings are the documented CPU preset, not the paper's recipe (see README).
set -euo pipefail
cd "$(dirname "$0")"
pip install -q -r requirements.txt
OUT=${OUT:-runs/quickstart}
CPU="--global-batch-size 32 --lr 3e-4 --ema 0.999 --num-workers 1 --log-every 100"
POST_STEPS=${POST_STEPS:-100}
T=${T:-10}

# 1. pretraining (if a run is there already, continue it)
resume=(); [ -f $OUT/pretrain/last.pt ] && resume=(--resume $OUT/pretrain/last.pt)
python train.py --preset cpu --router ec --steps ${PRETRAIN_STEPS:-3000} $CPU --out $OUT/pretrain "${resume[@]}"

# 2. SharpMoE post-training, and its controls: ordinary training for the same number of steps,
#    and for T times as many (a post-training step costs about T ordinary ones)
post() {  # post NAME STEPS FLAGS...
  local name=$1 steps=$2; shift 2
  local resume=(); [ -f $OUT/$name/last.pt ] && resume=(--resume $OUT/$name/last.pt)
  python train.py --init $OUT/pretrain/last.pt --steps $steps $CPU --out $OUT/$name "$@" "${resume[@]}"
}
post sharpmoe $POST_STEPS --trajectory-steps $T --routing-weight ${LAMBDA:-0.001}
post control-steps $POST_STEPS --sharpmoe off
post control-compute $((POST_STEPS * T)) --sharpmoe off
