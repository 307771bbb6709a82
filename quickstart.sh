#!/usr/bin/env bash
# The whole CPU quick start on the built-in strokes data: pretrain an EC-DiT, post-train it with
# SharpMoE (the paper's loss, and our count-aware one), run both controls (same steps; same
# compute), then sample and write the routing reports. Settings are the documented CPU preset,
# not the paper's recipe (see README). Rerunning continues where it stopped.
# OUT, PRETRAIN_STEPS, POST_STEPS, T override. On a CPU shared with other jobs, run it with
# OMP_NUM_THREADS=1 (README: 9 against 77 images/s measured on a busy 2-core machine).
set -euo pipefail
cd "$(dirname "$0")"
pip install -q -r requirements.txt
OUT=${OUT:-runs/quickstart}
CPU="--global-batch-size 32 --lr 3e-4 --grad-clip 1 --num-workers 1 --ckpt-every 250"
POST_STEPS=${POST_STEPS:-150}
T=${T:-4}
read -r load _ < /proc/loadavg 2>/dev/null || load=0
if [ -z "${OMP_NUM_THREADS:-}" ] && awk "BEGIN {exit !($load > 0.5 * $(nproc))}"; then
  echo "note: load average $load on $(nproc) cores; if this runs slowly, rerun with OMP_NUM_THREADS=1"
fi

run() {  # run NAME FLAGS...: train.py into OUT/NAME, resuming if it has a checkpoint
  local name=$1; shift
  local resume=(); [ -f $OUT/$name/last.pt ] && resume=(--resume $OUT/$name/last.pt)
  python train.py $CPU --out $OUT/$name "$@" "${resume[@]}"
}

# 1. pretraining
run pretrain --preset cpu --router ec --steps ${PRETRAIN_STEPS:-3000} --ema 0.999 --log-every 250

# 2. SharpMoE post-training, with the paper's routing loss and with our count-aware one (README:
#    "Mass is not count"), and the controls: ordinary training for the same number of steps, and
#    for T times as many (a post-training step costs about T ordinary ones). EMA 0.98: a short
#    run would barely move a 0.999 average.
INIT="--init $OUT/pretrain/last.pt --ema 0.98 --log-every 50"
run sharpmoe $INIT --steps $POST_STEPS --trajectory-steps $T
run sharpmoe-count $INIT --steps $POST_STEPS --trajectory-steps $T --routing-weight 0.01 \
    --routing-mass count --routing-target step --saliency-target residual
run control-steps $INIT --steps $POST_STEPS --sharpmoe off
run control-compute $INIT --steps $((POST_STEPS * T)) --sharpmoe off

# 3. samples and the routing reports (50 Euler steps here; the paper's 250 are sample.py's default).
#    --real: every checkpoint on the same held-out images and noise, so the reports compare directly.
for name in pretrain sharpmoe sharpmoe-count control-steps control-compute; do
  python sample.py --ckpt $OUT/$name/last.pt --weights model --steps 50 --grid 40 --report --real
done
echo "quick start done: see $OUT/*/log.txt and $OUT/*/samples/"
