"""
The whole comparison behind README's claim table, from one pretrained checkpoint, in one command:

    python compare.py --init runs/quickstart/pretrain/last.pt --out runs/compare

For each seed it post-trains (train.py, in this process, one run after another):
  control-steps      ordinary training, as many steps as SharpMoE            (--sharpmoe off)
  control-compute    ordinary training, T times as many (the same compute)   (--sharpmoe off)
  dual-only          SharpMoE's dual router and trajectory, no routing loss  (lambda 0)
  paper              the paper's loss at the paper's lambda                  (gate mass, trajectory sum, 0.001)
  paper-lambda-0.1   the paper's loss, 100 times stronger (what the gate mass does to counts)
  count-{trajectory,step}-LAMBDA, count-step-residual-LAMBDA
                     our count-aware routing mass, per target, over the lambda sweep
then the best count-aware setting again with --oracle, R_sal seeing the true x0 in training and
in the measurement: can it route the early steps at all when it knows the image? "Best": the
highest position-controlled correlation averaged over all steps and seeds, among the count-aware
settings whose held-out loss (averaged over steps) stays within 5% of the same-compute control's.
Every run, and the pretrained checkpoint, is measured with sm.routing_probe on held-out images
with fixed noise: per step, the rank correlation of expert count with saliency (raw, and
position-controlled), the flow-matching loss, and the mean count per saliency quintile at the
early steps. Mean and spread over the seeds go to OUT/table.md and
OUT/results.json. Rerunning skips finished runs and resumes killed ones.
"""
import argparse
import json
import os

import numpy as np
import torch

import sample
import sharpmoe as sm
import train

SHOW_T = (0.999, 0.95, 0.8, 0.5, 0.2, 0.05)                    # the table's steps
EARLY_T = (0.999, 0.95, 0.875, 0.8)                            # "early steps": t >= 0.8


def settings(args):
    """(name, train.py flags) of every run but the oracle, for one seed."""
    S, T = args.steps, args.trajectory_steps
    post = ["--trajectory-steps", str(T)]
    runs = [("control-steps", ["--sharpmoe", "off", "--steps", str(S)]),
            ("control-compute", ["--sharpmoe", "off", "--steps", str(S * T)]),
            ("dual-only", post + ["--steps", str(S), "--routing-weight", "0"]),
            ("paper", post + ["--steps", str(S), "--routing-weight", "0.001"]),
            ("paper-lambda-0.1", post + ["--steps", str(S), "--routing-weight", "0.1"])]
    for target, residual in (("trajectory", False), ("step", False), ("step", True)):
        for lam in args.lambdas:
            name = f"count-{target}{'-residual' if residual else ''}-{lam:g}"
            runs.append((name, post + ["--steps", str(S), "--routing-weight", str(lam), "--routing-mass", "count",
                                       "--routing-target", target, "--saliency-target", "residual" if residual else "raw"]))
    return runs


def train_run(args, name, flags, seed):
    """train.py into OUT/seedN/NAME; skipped when finished, resumed when killed."""
    out = os.path.join(args.out, f"seed{seed}", name)
    ckpt = os.path.join(out, "last.pt")
    steps = int(flags[flags.index("--steps") + 1])
    resume = []
    if os.path.exists(ckpt):
        if train.load_checkpoint(ckpt)["step"] == steps:
            return ckpt
        resume = ["--resume", ckpt]
    print(f"\n== seed {seed}: {name}", flush=True)
    train.main(train.parse_args([
        "--init", args.init, "--seed", str(seed), "--out", out, "--global-batch-size", str(args.global_batch_size),
        "--lr", str(args.lr), "--grad-clip", "1", "--ema", str(args.ema), "--num-workers", str(args.num_workers),
        "--log-every", str(args.log_every), "--ckpt-every", str(args.log_every), "--probe-images", str(args.probe_images),
        *data_flags(args), *flags, *resume]))
    return ckpt


def data_flags(args):
    """The pretrained checkpoint's data: the same for every run."""
    a = args.init_args
    flags = ["--image-size", str(a["image_size"]), "--builtin-size", str(args.builtin_size or a["builtin_size"])]
    if a.get("data"):
        return flags + ["--data", a["data"]] + (["--val-data", a["val_data"]] if a.get("val_data") else [])
    return flags + ["--builtin", a.get("builtin", "shapes")]


@torch.no_grad()
def measure(ckpt, probe_set, weights, oracle=False):
    """sm.routing_probe of a checkpoint on the probe set: per-step lists, and early-step quintiles."""
    model, _ = sample.load_model(ckpt, weights, "cpu")
    x0, y, eps = probe_set
    r = sm.routing_probe(model, x0, y, eps, oracle=oracle)
    M = sm.laplacian_saliency(x0, model.cfg.patch_size)
    quintile = M.argsort(1).argsort(1) * 5 // M.shape[1]           # (B, N) in 0..4, per image
    early = r["counts"][[sm.PROBE_T.index(t) for t in EARLY_T]].float().mean(0)   # (B, N)
    return dict(corr=r["corr"].tolist(), corr_pos=r["corr_pos"].tolist(), loss=r["loss"].tolist(),
                quintiles=[float(early[quintile == q].mean()) for q in range(5)])


def best_count_setting(measured):
    """The count-aware setting with the highest position-controlled correlation (mean over steps
    and seeds) among those whose held-out loss stays within 5% of the same-compute control's."""
    mean = lambda name, key: np.mean([r[key] for r in measured[name]])
    budget = 1.05 * mean("control-compute", "loss")
    fair = [n for n in measured if n.startswith("count-") and mean(n, "loss") <= budget]
    return max(fair or [n for n in measured if n.startswith("count-")], key=lambda n: mean(n, "corr_pos"))


def summarize(per_seed):
    """{key: per-step list} over seeds -> {key: (mean list, spread list)}, spread = max - min,
    and n, the number of seeds."""
    out = dict(n=len(per_seed))
    for key in per_seed[0]:
        v = np.array([r[key] for r in per_seed])
        out[key] = (v.mean(0).tolist(), (v.max(0) - v.min(0)).tolist())
    return out


def table(results):
    """Markdown: three per-step tables (raw, position-controlled, held-out loss) and quintiles."""
    cols = [sm.PROBE_T.index(t) for t in SHOW_T]
    head = lambda first: [f"| {first} | " + " | ".join(f"t={t:g}" for t in SHOW_T) + " |",
                          "|---|" + "---|" * len(SHOW_T)]
    cell = lambda m, s, f, n: format(m, f) + (" ± " + format(s / 2, f.lstrip("+")) if n > 1 else "")
    lines = []
    for key, title, f in (("corr", "Rank correlation (expert count, saliency), raw", "+.2f"),
                          ("corr_pos", "Position-controlled correlation (count against each token's saliency rank minus "
                                       "that rank's mean at its position)", "+.2f"),
                          ("loss", "Held-out flow-matching loss at the same t and noise", ".3f")):
        lines += ["", f"**{title}**", ""] + head("run")
        for name, r in results.items():
            m, s = r[key]
            lines.append(f"| {name} | " + " | ".join(cell(m[i], s[i], f, r["n"]) for i in cols) + " |")
    lines += ["", "**Mean expert count per saliency quintile (Q1 least salient), early steps (t >= 0.8)**", "",
              "| run | Q1 | Q2 | Q3 | Q4 | Q5 |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        m, s = r["quintiles"]
        lines.append(f"| {name} | " + " | ".join(cell(m[q], s[q], ".2f", r["n"]) for q in range(5)) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=train.HelpFormatter)
    p.add_argument("--init", required=True, help="the pretrained checkpoint every run starts from")
    p.add_argument("--out", default="runs/compare", help="output folder (runs, table.md, results.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="post-training seeds (two or more)")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.001, 0.01, 0.1], help="the count-aware sweep")
    p.add_argument("--steps", type=int, default=150, help="post-training steps (the controls: this, and T times this)")
    p.add_argument("--trajectory-steps", type=int, default=4, help="T")
    p.add_argument("--global-batch-size", type=int, default=32, help="images per step")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (the CPU preset's)")
    p.add_argument("--ema", type=float, default=0.98, help="EMA decay of the post-training runs")
    p.add_argument("--weights", choices=("ema", "model"), default="model",
                   help="which weights are measured (model: what training produced; the pretrained EMA lags)")
    p.add_argument("--eval-images", type=int, default=512, help="held-out images measured per run")
    p.add_argument("--builtin-size", type=int, default=0, help="built-in training images (0: the checkpoint's)")
    p.add_argument("--num-workers", type=int, default=1, help="data-loader workers")
    p.add_argument("--log-every", type=int, default=50, help="log (and checkpoint) every this many steps")
    p.add_argument("--probe-images", type=int, default=train.PROBE_IMAGES, help="images of each run's logged probe")
    p.add_argument("--pretrained-only", action="store_true", help="measure the --init checkpoint only, train nothing")
    args = p.parse_args(argv)
    ckpt = train.load_checkpoint(args.init)
    if ckpt["config"]["sharpmoe"] or ckpt["config"]["router"] not in sm.POOL_DIMS:
        raise train.UserError(f"--init {args.init} must be a pretrained ec or diffmoe model without R_sal")
    args.init_args = ckpt["args"]
    return args


def main(args):
    os.makedirs(args.out, exist_ok=True)
    _, held_out = train.make_datasets(train.parse_args(data_flags(args)))
    n = min(args.eval_images, len(held_out))
    x0 = torch.stack([held_out[i][0] for i in range(n)])
    probe_set = (x0, torch.tensor([held_out[i][1] for i in range(n)]),
                 torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    measured = {"pretrained": [measure(args.init, probe_set, args.weights)]}
    if args.pretrained_only:
        print(table({"pretrained": summarize(measured["pretrained"])}))
        return measured
    # 1. the sweep, every seed
    runs = settings(args)
    ckpts = {name: [train_run(args, name, flags, seed) for seed in args.seeds] for name, flags in runs}
    # 2. measure every run on the same held-out images and noise
    measured |= {name: [measure(c, probe_set, args.weights) for c in paths] for name, paths in ckpts.items()}
    # 3. the best count-aware setting again with --oracle
    best = best_count_setting(measured)
    flags = dict(runs)[best] + ["--oracle"]
    measured[f"oracle ({best})"] = [measure(train_run(args, best + "-oracle", flags, s), probe_set, args.weights, oracle=True)
                                    for s in args.seeds]
    # 4. the table
    results = {name: summarize(r) for name, r in measured.items()}
    md = (f"From `{args.init}`: {args.steps} post-training steps at T = {args.trajectory_steps}, seeds "
          f"{', '.join(map(str, args.seeds))}, {args.weights} weights, {n} held-out images, fixed noise; "
          f"mean ± half the range over seeds. Best count-aware setting (position-controlled correlation, "
          f"held-out loss within 5% of control-compute): {best}; its oracle row routes with the true x0 in "
          f"training and here.\n" + table(results))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(t=list(sm.PROBE_T), best=best, per_seed=measured), f, indent=1)
    print("\n" + md + f"\n\nwrote {args.out}/table.md and {args.out}/results.json")
    return results


if __name__ == "__main__":
    train.run_cli(main, parse_args)
