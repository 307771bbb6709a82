#!/usr/bin/env bash
# The whole CPU quick start on the built-in shapes: pretrain an EC-DiT, post-train it with
# SharpMoE, run both controls (same steps; same compute), then sample and write the routing
# reports. Settings are the documented CPU preset, not the paper's recipe (see README).
# Rerunning continues where it stopped. OUT, PRETRAIN_STEPS, POST_STEPS, T, LAMBDA override.
set -euo pipefail
cd "$(dirname "$0")"
pip install -q -r requirements.txt
OUT=${OUT:-runs/quickstart}
CPU="--global-batch-size 32 --lr 3e-4 --grad-clip 1 --num-workers 1 --log-every 100"
POST_STEPS=${POST_STEPS:-100}
T=${T:-10}

run() {  # run NAME FLAGS...: train.py into OUT/NAME, resuming if it has a checkpoint
  local name=$1; shift
  local resume=(); [ -f $OUT/$name/last.pt ] && resume=(--resume $OUT/$name/last.pt)
  python train.py $CPU --out $OUT/$name "$@" "${resume[@]}"
}

# 1. pretraining
run pretrain --preset cpu --router ec --steps ${PRETRAIN_STEPS:-3000} --ema 0.999

# 2. SharpMoE post-training, and its controls: ordinary training for the same number of steps,
#    and for T times as many (a post-training step costs about T ordinary ones). EMA 0.98: the
#    short post-training runs would barely move a 0.999 average.
INIT="--init $OUT/pretrain/last.pt --ema 0.98"
run sharpmoe $INIT --steps $POST_STEPS --trajectory-steps $T --routing-weight ${LAMBDA:-0.001}
run control-steps $INIT --steps $POST_STEPS --sharpmoe off
run control-compute $INIT --steps $((POST_STEPS * T)) --sharpmoe off

# 3. samples and the routing reports (50 Euler steps here; the paper's 250 are sample.py's default).
#    --real: every checkpoint on the same real images and noise, so the reports compare directly.
for name in pretrain sharpmoe control-steps control-compute; do
  python sample.py --ckpt $OUT/$name/last.pt --steps 50 --grid 40 --report --real
done
python sample.py --ckpt $OUT/sharpmoe/last.pt --steps 50 --grid 0 --report
echo "quick start done: see $OUT/*/log.txt and $OUT/*/samples/"
