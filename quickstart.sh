#!/usr/bin/env bash
# The whole CPU quick start on the built-in strokes data: pretrain an EC-DiT; post-train it with
# SharpMoE (the paper's loss, and our count-aware one) beside both controls, 150 steps, measured
# in compare.py's views; then sample and write the routing reports. The CPU recipe
# (train.py --recipe cpu, ours), not the paper's. Rerunning continues where it stopped.
# On a CPU shared with other jobs, run it with OMP_NUM_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")"
pip install -q -r requirements.txt
OUT=${OUT:-runs/quickstart}
read -r load _ < /proc/loadavg 2>/dev/null || load=0
if [ -z "${OMP_NUM_THREADS:-}" ] && awk "BEGIN {exit !($load > 0.5 * $(nproc))}"; then
  echo "note: load average $load on $(nproc) cores; if this runs slowly, rerun with OMP_NUM_THREADS=1"
fi

# 1. pretraining: 3000 steps of the cpu preset (2.6M parameters, 8 experts in every other block)
resume=(); [ -f $OUT/pretrain/last.pt ] && resume=(--resume $OUT/pretrain/last.pt)
python train.py --recipe cpu --router ec --out $OUT/pretrain "${resume[@]}"

# 2. SharpMoE post-training (paper, count) and both controls (control-steps, control-compute),
#    one seed, 150 steps at T = 4, each measured on held-out images and along its own rollout:
#    OUT/results/ec.md and its figures
python compare.py --init $OUT/pretrain/last.pt --out $OUT --results $OUT/results --seeds 0 --budgets 150 \
    --settings paper count control-steps control-compute --rollout-images 64

# 3. samples (50 Euler steps here; the paper's 250 are sample.py's default) and the routing report
#    on the same held-out images and noise, for paper, count and control-steps (the control at 150)
for run in paper count control; do
  ckpt=$OUT/ec/seed0/$run/step150.pt
  python sample.py --ckpt $ckpt --weights model --steps 50 --grid 40 --report --real
done
echo "quick start done: see $OUT/results/ec.md, $OUT/pretrain/log.txt, $OUT/ec/seed0/*/log.txt and $OUT/ec/seed0/*/samples/"
