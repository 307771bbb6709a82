#!/usr/bin/env bash
# The whole CPU quick start on the built-in glyphs data (16x16): pretrain an EC-DiT; post-train it
# with SharpMoE (the paper's loss, and our count-aware one) beside both controls, 150 steps, each
# measured in compare.py's views and by the sample-quality classifier; then class-marked sample
# grids and routing reports. The CPU recipe (train.py --recipe cpu, ours), not the paper's.
# Rerunning continues where it stopped. On a CPU shared with other jobs, use OMP_NUM_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")"
pip install -q -r requirements.txt
OUT=${OUT:-runs/quickstart}
mkdir -p $OUT
read -r load _ < /proc/loadavg 2>/dev/null || load=0
if [ -z "${OMP_NUM_THREADS:-}" ] && awk "BEGIN {exit !($load > 0.5 * $(nproc))}"; then
  echo "note: load average $load on $(nproc) cores; if this runs slowly, rerun with OMP_NUM_THREADS=1"
fi

# 1. pretraining: 12000 steps of the cpu recipe (2.6M parameters, 8 experts in every other block)
resume=(); [ -f $OUT/pretrain/last.pt ] && resume=(--resume $OUT/pretrain/last.pt)
python train.py --recipe cpu --router ec --out $OUT/pretrain "${resume[@]}"

# 2. SharpMoE post-training (paper, count) and both controls (control-steps, control-compute), one
#    seed, 150 steps at T = 4, each measured on held-out images, along its own rollout, and by
#    the quality of 300 samples (classifier.py's classifier, trained once in OUT/classifier)
python compare.py --init $OUT/pretrain/last.pt --out $OUT --results $OUT/results --seeds 0 --budgets 150 \
    --settings paper count control-steps control-compute --rollout-images 64 --quality-samples 300 \
  | tee $OUT/compare.log

# 3. grids (50 Euler steps; the paper's 250 are sample.py's default), each tile marked green when
#    the classifier recognizes its class, and the routing report along each run's own rollout
#    (control: control-steps at 150 steps)
python sample.py --ckpt $OUT/pretrain/last.pt --weights model --sample-steps 50 --grid 40 \
    --classifier $OUT/classifier/classifier.pt                  # (the weights compare.py measures)
for run in paper count control; do
  python sample.py --ckpt $OUT/ec/seed0/$run/step150.pt --weights model --sample-steps 50 --grid 40 \
      --classifier $OUT/classifier/classifier.pt --report rollout
done
echo "quick start done: see $OUT/results/ec.md, $OUT/pretrain/samples/grid.png and $OUT/ec/seed0/*/samples/"
grep "^sample quality" $OUT/compare.log
