"""
The claim, measured: from pretrained MoE checkpoints, post-train SharpMoE and both controls at
several budgets and seeds, measure expert count against saliency in three views, and write the
tables and figures that README links to.

    python compare.py --init runs/base/ec/last.pt runs/base/diffmoe/last.pt \\
        --reference runs/base/dense/last.pt --out runs/compare --results results

For each base (--init), seed and post-training budget B (--budgets), with train.py --recipe cpu:
  control-steps     ordinary training for B steps                          (--sharpmoe off)
  control-compute   ordinary training for T B steps: the same compute      (--sharpmoe off)
  dual-only         SharpMoE's dual router and trajectories, no routing loss (lambda 0; the
                    paper's ablation, and its whole method for TC, whose counts are all equal)
  paper             SharpMoE, the paper's loss: gate mass, one KL on the trajectory sum, lambda 0.001
  count             SharpMoE, ours: soft-count mass, one KL per step, M less the data's mean
                    saliency per position, lambda 0.01 (the best of the --sweep on EC at 150 steps on
                    the strokes-era recipe, results/archive/: the highest correlation beyond position
                    over all steps, noised view, within 5% of control-compute's held-out loss)
  count-oracle      `count` with R_sal given the true x0 in training and measurement: what R_sal can
                    learn to route by at this budget, the bound for x0_hat (not a method)
  count-nopos       `count` with R_sal reading x0_hat without the position embedding (budgets <= 600)
A TC base runs the controls and dual-only. --sweep adds, at the first budget: the paper's loss at
lambda 0.1, and the count-aware mass over scope, target and lambda. Each setting is one run per seed that continues
from budget to budget (snapshots OUT/ROUTER/seedS/RUN/stepN.pt; the two controls are one run,
taken at B and T B steps; budgets run in ascending order, so the small ones finish first).
Rerunning skips what exists and resumes what was killed.

Every snapshot and each base is measured per denoising step (cached beside it, stepN.json): the
mean per-image rank correlation of expert count with Laplacian saliency (raw: the paper's
measure) and the position-controlled correlation (sm.position_controlled_correlation), in
  noised     held-out images noised along one trajectory, x0_hat chained (sm.routing_probe),
             with the held-out flow-matching loss at the same t and noise
  rollout    the checkpoint's own Euler rollout (cfg 1.5) against its own final images, as the
             paper measures "along the generation rollout"; counts can cause saliency here (a
             token given more experts may get more detail)
  reference  the Euler states of a dense model trained on the same data (--reference), routed by
             the checkpoint with x0_hat chained from its own velocity, against the dense model's
             final images: generation without that feedback
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import sharpmoe as sm
from common import (RECIPES, HelpFormatter, UserError, atomic, cached, check_writable, hold_lock, load_checkpoint,
                    load_model, load_reference, noise_and_labels, run_cli, save_image, write_json, write_text)
from data import DATA_FLAGS, data_flags, make_datasets, probe_batch, spread_batch
from quality import load_classifier, model_quality

HERE = os.path.dirname(os.path.abspath(__file__))
COUNT = ["--routing-mass", "count", "--routing-scope", "step", "--saliency-target", "residual", "--routing-weight", "0.01"]
VIEWS = ("noised", "rollout", "reference")
MIN_GAP = 0.05        # an oracle bound below this leaves nothing to close: no fraction is shown


def settings(args):
    """(name, run, train.py flags, steps at budget B, the last budget it runs at) of every row.
    The two controls are one run: ordinary training measured at B and at T B steps."""
    T, last, first = args.trajectory_steps, args.budgets[-1], args.budgets[0]
    control = ["--sharpmoe", "off"]
    rows = [("control-steps", "control", control, 1, last), ("control-compute", "control", control, T, last),
            ("dual-only", "dual-only", ["--routing-weight", "0"], 1, last),
            ("paper", "paper", [], 1, last), ("count", "count", COUNT, 1, last),
            ("count-oracle", "count-oracle", COUNT + ["--oracle"], 1, last),
            ("count-nopos", "count-nopos", COUNT + ["--sal-position", "off"], 1,
             max([first] + [b for b in args.budgets if b <= 600]))]
    if args.sweep:
        rows += [("paper-lambda-0.1", "paper-lambda-0.1", ["--routing-weight", "0.1"], 1, first)]
        for scope, target in (("trajectory", "raw"), ("step", "raw"), ("step", "residual")):
            for lam in ("0.001", "0.01", "0.1"):
                name = f"count-{scope}{'-residual' if target == 'residual' else ''}-{lam}"
                flags = ["--routing-mass", "count", "--routing-scope", scope, "--saliency-target", target,
                         "--routing-weight", lam]
                rows.append((name, "count" if flags == COUNT else name, flags, 1, first))
    return [r for r in rows if not args.settings or r[0] in args.settings]


def schedule(args, runs):
    """(budget, run, flags, steps) in training order: by the budget that first needs a snapshot,
    each run's snapshots in ascending steps (a run only goes forward)."""
    need = {}
    for _, run, flags, factor, last in runs:
        for b in args.budgets:
            if b <= last:
                targets = need.setdefault(run, (flags, {}))[1]
                targets[b * factor] = min(targets.get(b * factor, b), b)
    order = []
    for run, (flags, targets) in need.items():
        phase = 0
        for steps in sorted(targets):
            phase = max(phase, targets[steps])                  # never behind a smaller snapshot
            order.append((phase, run, flags, steps))
    return sorted(order, key=lambda o: (o[0], list(need).index(o[1]), o[3]))


def snapshot(args, base, run, seed, steps):
    return os.path.join(args.out, base["router"], f"seed{seed}", run, f"step{steps}.pt")


def run(cmd, what):
    """A child process (train.py, classifier.py); Ctrl-C or SIGTERM (see main) stops it too."""
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except BaseException:                                      # no orphan writing on
        proc.terminate()
        proc.wait()
        raise
    if code:
        raise UserError(f"{what} stopped (its log and the lines above say why); rerun this command to continue")


def train_to(args, base, run_name, flags, seed, steps):
    """Snapshot OUT/ROUTER/seedS/RUN/stepN.pt of one run after `steps` steps: train.py continues
    the run (or starts it) up to there, then last.pt is copied."""
    out = os.path.dirname(snapshot(args, base, run_name, seed, steps))
    snap, last = os.path.join(out, f"step{steps}.pt"), os.path.join(out, "last.pt")
    if os.path.exists(snap):
        return snap
    at = load_checkpoint(last)["step"] if os.path.exists(last) else 0
    if at > steps:
        raise UserError(f"{last} is at step {at}, past {steps}, and has no snapshot; delete {out} to rerun it")
    if at < steps:
        print(f"\n== {base['router']} seed {seed}: {run_name}, steps {at} -> {steps}", flush=True)
        cmd = [sys.executable, os.path.join(HERE, "train.py"), "--recipe", args.recipe, "--init", base["path"],
               "--seed", str(seed), "--out", out, "--steps", str(steps), "--backward", args.backward,
               "--log-every", str(args.log_every), "--ckpt-every", str(args.log_every), "--probe-every", str(args.log_every),
               "--num-workers", str(args.num_workers), "--probe-images", str(args.probe_images),
               *base["data_flags"], *flags, *(["--resume", last] if at else [])]
        run(cmd, f"train.py in {out}")
    with atomic(snap) as tmp:
        shutil.copyfile(last, tmp)
    return snap


# ----------------------------------------------------------------------------------------------
# Measuring a checkpoint in the three views

class Views:
    """The fixed inputs of the three views for one base's data, the same for every checkpoint:
    held-out images and noise; rollout noise and labels; the reference's states and images."""

    def __init__(self, args, base_args, cfg, classifier=None):
        train_set, held_out = make_datasets(**data_flags(base_args))
        self.x0, self.y, self.eps = probe_batch(held_out, args.eval_images)
        x0, y = spread_batch(train_set, 128)                   # DiffMoE's compute calibration
        self.calibration = (x0, y, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
        self.noise, self.labels = noise_and_labels(range(args.rollout_images), cfg, seed=0)
        self.steps, self.cfg_scale, self.reference = args.sample_steps, args.cfg_scale, None
        self.classifier = None                                  # (the sample-quality measure)
        if classifier:
            clf, clf_ckpt = load_classifier(classifier)
            self.classifier = (clf, clf_ckpt, args.quality_samples, args.sample_steps)
        if args.reference:
            ref = load_reference(args.reference, cfg, args.weights)
            if data_flags(load_checkpoint(args.reference)["args"]) != data_flags(base_args):
                raise UserError(f"--reference {args.reference} was trained on other data than the --init models "
                                "(train.py --router dense with their data flags)")
            x, ts, _, states = sm.rollout_routing(ref, self.noise, self.labels, self.steps, self.cfg_scale)
            self.reference = (states, ts, x)

    def measure(self, model, oracle=False):
        """{view: {t, corr, corr_pos, compute[, loss, quintiles]}}, per denoising step; compute:
        experts per token per MoE layer. The oracle routes with the true x0 (noised) or the
        reference's image (reference); it has no own rollout."""
        r = sm.routing_probe(model, self.x0, self.y, self.eps, oracle=oracle)
        M = sm.laplacian_saliency(self.x0, model.cfg.patch_size)
        early = r["counts"][torch.tensor(sm.PROBE_T) >= sm.EARLY].float().mean(0)   # (B, N)
        out = dict(noised=dict(t=list(sm.PROBE_T), corr=r["corr"].tolist(), corr_pos=r["corr_pos"].tolist(),
                               compute=compute(r["counts"], model), loss=r["loss"].tolist(),
                               quintiles=sm.saliency_quintiles(early, M).tolist()))
        if not oracle:
            x, ts, counts, _ = sm.rollout_routing(model, self.noise, self.labels, self.steps, self.cfg_scale)
            out["rollout"] = dict(t=ts.tolist(), compute=compute(counts, model),
                                  **listed(sm.count_saliency(counts, saliency(x, model))))
        if self.reference is not None:
            states, ts, x = self.reference
            counts = sm.routing_along(model, states, ts, self.labels, self.cfg_scale, x if oracle else None)
            out["reference"] = dict(t=ts.tolist(), compute=compute(counts, model),
                                    **listed(sm.count_saliency(counts, saliency(x, model))))
        return out

    def calibrate(self, model, target, oracle=False, iterations=12):
        """DiffMoE's compute is a free variable at inference; the paper compares matched
        activated parameters. Shift every threshold by one offset in logit space (DiffMoE's
        capacity knob, ours: bisection) until noised training images (x0_hat chained, as the
        noised view) get `target` experts per token per MoE layer on average. Returns the
        offset."""
        layers = model.moe_layers()
        logits = [torch.logit(m.thresholds.clamp(1e-6, 1 - 1e-6)) for m in layers]
        lo, hi = -12.0, 12.0                                    # higher offset, fewer experts
        for _ in range(iterations):
            mid = (lo + hi) / 2
            for m, l in zip(layers, logits):
                m.thresholds.copy_(torch.sigmoid(l + mid))
            counts = sm.routing_probe(model, *self.calibration, oracle=oracle)["counts"]
            lo, hi = (mid, hi) if counts.float().mean() / len(layers) > target else (lo, mid)
        return mid


def compute(counts, model):
    """Experts per token per MoE layer at each step of counts (K, B, N)."""
    return (counts.float().mean((1, 2)) / len(model.moe_layers())).tolist()


def saliency(x, model):
    return sm.laplacian_saliency(x, model.cfg.patch_size)


def listed(d):
    return {k: v.tolist() for k, v in d.items()}


def measured(args, views, ckpt, oracle=False):
    """views.measure of a checkpoint, cached beside it as .json (delete the file to measure again)."""
    cache = os.path.splitext(ckpt)[0] + ".json"
    key = dict(eval_images=args.eval_images, rollout_images=args.rollout_images, sample_steps=args.sample_steps,
               cfg_scale=args.cfg_scale, weights=args.weights, compute=args.compute,
               reference=os.path.abspath(args.reference) if args.reference else None,
               quality=[args.quality_samples, views.classifier and views.classifier[1]["accuracy"]])
    def measure():
        model = calibrated(args, views, ckpt, oracle)
        result = views.measure(model, oracle)
        if views.classifier and not oracle:                    # (an oracle samples without its x0)
            result["quality"] = {str(s): quality_without_images(model, views, s) for s in QUALITY_CFG}
        return result
    return cached(cache, key, measure)


def calibrated(args, views, ckpt, oracle=False):
    """The checkpoint's model, DiffMoE's thresholds calibrated to --compute."""
    model, _ = load_model(ckpt, args.weights)
    if model.cfg.router == "diffmoe" and args.compute:
        views.calibrate(model, args.compute, oracle)
    return model


QUALITY_CFG = (1.0, 1.5)   # the paper's two guidance scales


def quality_without_images(model, views, cfg_scale, seed=0):
    """quality.model_quality of the checkpoint (accuracy, Fréchet distance, floor)."""
    clf, clf_ckpt, n, steps = views.classifier
    q = model_quality(model, clf, clf_ckpt, n=n, steps=steps, cfg_scale=cfg_scale, seed=seed)
    q.pop("images")
    return q


def quality_line(results, base):
    """One line: each checkpoint's sample quality at cfg 1.5 (seed 0's), beside the floor."""
    pre = results["pretrained"]["quality"]["1.5"]
    runs = [f"{name} {b} {seeds[0]['quality']['1.5']['accuracy']:.0%}" for name, by in results["runs"].items()
            for b, seeds in by.items() if "quality" in seeds[0]]
    return (f"sample quality of {base['router']} (cfg 1.5, {pre['n']} samples): recognized as their class: pretrained "
            f"{pre['accuracy']:.0%}" + "".join(f", {r}" for r in runs) + f" (real images: "
            f"{results['classifier_accuracy']:.0%}); Fréchet distance of the pretrained {pre['fd']:.2f}, floor "
            f"{pre['floor']:.2f}")


def seed1_quality(args, views, path):
    """The base's quality at cfg 1.5 under another noise seed (the seed-to-seed part of the floor)."""
    key = [args.quality_samples, args.sample_steps, views.classifier[1]["accuracy"], args.weights, args.compute]
    return cached(os.path.splitext(path)[0] + ".quality-seed1.json", key,
                  lambda: quality_without_images(calibrated(args, views, path), views, 1.5, seed=1))


def classifier_for(args, base):
    """The sample-quality classifier of a base's data: --classifier, or OUT/classifier/ trained
    once by classifier.py on the base's data flags."""
    path = args.classifier or os.path.join(args.out, "classifier", "classifier.pt")
    if not os.path.exists(path):
        if args.classifier:
            raise UserError(f"--classifier {path} does not exist; train one with python classifier.py")
        print(f"\n== the sample-quality classifier: {path}", flush=True)
        run([sys.executable, os.path.join(HERE, "classifier.py"), "--out", os.path.dirname(path), *base["data_flags"]],
            "classifier.py")
    return path


# ----------------------------------------------------------------------------------------------
# Tables and figures

def early(view, key="corr_pos"):
    """A view's mean over its early steps (t >= sm.EARLY)."""
    return float(np.mean([v for t, v in zip(view["t"], view[key]) if t >= sm.EARLY]))


def over_seeds(rows, fn):
    """fn over each seed's measurement: (mean, half the range), or None if none has it."""
    v = [fn(r) for r in rows]
    v = [x for x in v if x is not None]
    return (float(np.mean(v)), float((max(v) - min(v)) / 2)) if v else None


def cell(ms, f):
    if ms is None:
        return "-"
    return format(ms[0], f) + (f" ± {format(ms[1], f.lstrip('+'))}" if round(ms[1], int(f[-2])) else "")


def tables(results, base, args):
    """Markdown for one base: the summary, then per view and budget the per-step tables."""
    names = list(results["runs"])
    budgets = [b for b in args.budgets if any(b in results["runs"][n] for n in names)]
    view_of = lambda name, b, v: [r.get(v) for r in results["runs"].get(name, {}).get(b, [])]
    get = lambda name, b, v, fn: over_seeds(view_of(name, b, v), lambda r: None if r is None else fn(r))
    pre = results["pretrained"]
    views = [v for v in VIEWS if v in pre]                      # (reference: only with --reference)
    seeds = (f"seeds {', '.join(map(str, args.seeds))}; mean ± half the range over seeds" if len(args.seeds) > 1
             else f"one seed ({args.seeds[0]})")
    what = {"noised": f"{args.eval_images} held-out images noised along one trajectory",
            "rollout": f"{args.rollout_images} samples of the checkpoint itself (counts can cause saliency here)",
            "reference": "the same noise and labels through a dense model's rollout, routed by the checkpoint"}
    lines = [f"# {base['router']}: the claim at {', '.join(map(str, budgets))} post-training steps", "",
             f"Made by `{results['command']}`. From `{base['path']}` ({base['router']}, recipe {args.recipe}, "
             f"T = {args.trajectory_steps}, {args.weights} weights), {seeds}. Views: "
             + "; ".join(f"{v} = {what[v]}" for v in views) + f" ({args.sample_steps} Euler steps, cfg {args.cfg_scale:g}). "
             f"Early steps: t >= {sm.EARLY}."
             + (f" Compute matched: every checkpoint's thresholds calibrated to {args.compute:g} experts per token "
                "per MoE layer on noised training images (compare.Views.calibrate)."
                if base["router"] == "diffmoe" and args.compute else "")
             + (" The oracle's held-out loss is not comparable: the true x0 reaches the prediction through the "
                "routing." if "count-oracle" in names else ""), "",
             "## Summary: early-step position-controlled correlation, and held-out loss", "",
             "| budget | run | " + " | ".join(f"early, {v}" for v in views) + " | held-out loss (mean over t) | "
             "experts per token per layer (noised, mean over t) |",
             "|---|---|" + "---|" * (len(views) + 2)]
    mean_of = lambda key: lambda r: float(np.mean(r[key])) if key in r else None
    lines.append("| 0 | pretrained | " + " | ".join(cell((early(pre[v]), 0), "+.3f") for v in views)
                 + f" | {np.mean(pre['noised']['loss']):.4f} | {cell(over_seeds([pre['noised']], mean_of('compute')), '.2f')} |")
    for b in budgets:
        for name in names:
            if b in results["runs"][name]:
                lines.append(f"| {b} | {name} | " + " | ".join(cell(get(name, b, v, early), "+.3f") for v in views)
                             + f" | {cell(get(name, b, 'noised', mean_of('loss')), '.4f')}"
                             + f" | {cell(get(name, b, 'noised', mean_of('compute')), '.2f')} |")
    lines += quality_table(results, names, budgets, get, args)
    gaps = []
    for b in budgets:
        for v in ("noised", "reference"):                       # (the oracle has no own rollout)
            ref, orc = get("control-compute", b, v, early), get("count-oracle", b, v, early)
            if ref and orc:
                gap = orc[0] - ref[0]
                frac = lambda n: (lambda m: "-" if m is None else "(no gap)" if gap < MIN_GAP else
                                  f"{(m[0] - ref[0]) / gap:+.2f}")(get(n, b, v, early))
                gaps.append(f"| {b} | {v} | {gap:+.3f} | {frac('paper')} | {frac('count')} | {frac('count-nopos')} |")
    if gaps:
        lines += ["", "## The gap to the oracle that x0_hat closes, early steps: (run - control-compute) / "
                  f"(count-oracle - control-compute), position-controlled (shown where the gap is {MIN_GAP} or more)",
                  "",
                  "| budget | view | oracle - control-compute | paper | count | count-nopos |", "|---|---|---|---|---|---|",
                  *gaps]
    for b in budgets:
        for v in VIEWS:
            rows = [(n, results["runs"][n][b]) for n in names if b in results["runs"][n] and results["runs"][n][b][0].get(v)]
            if not rows:
                continue
            ts = rows[0][1][0][v]["t"]
            cols = sm.show_steps(ts)
            for key, title, f in (("corr", "raw rank correlation", "+.2f"),
                                  ("corr_pos", "position-controlled correlation", "+.2f"),
                                  ("compute", "experts per token per MoE layer", ".2f")):
                if key not in rows[0][1][0][v]:                 # (measured before compute was recorded)
                    continue
                lines += ["", f"### {b} steps, {v} view: {title}", "",
                          "| run | " + " | ".join(f"t={ts[c]:.3g}" for c in cols) + " |", "|---|" + "---|" * len(cols)]
                if v in pre:
                    lines.append("| pretrained | " + " | ".join(format(pre[v][key][c], f) for c in cols) + " |")
                for n, seeds in rows:
                    lines.append(f"| {n} | " + " | ".join(cell(over_seeds(seeds, lambda r: r[v][key][c]), f)
                                                         for c in cols) + " |")
        rows = [(n, results["runs"][n][b]) for n in names if b in results["runs"][n]]
        ts = pre["noised"]["t"]
        cols = sm.show_steps(ts)
        lines += ["", f"### {b} steps, noised view: held-out flow-matching loss", "",
                  "| run | " + " | ".join(f"t={ts[c]:.3g}" for c in cols) + " |", "|---|" + "---|" * len(cols),
                  "| pretrained | " + " | ".join(f"{pre['noised']['loss'][c]:.3f}" for c in cols) + " |"]
        for n, seeds in rows:
            lines.append(f"| {n} | " + " | ".join(cell(over_seeds(seeds, lambda r: r["noised"]["loss"][c]), ".3f")
                                                 for c in cols) + " |")
        lines += ["", f"### {b} steps, noised view: mean expert count per saliency quintile at early steps "
                  "(Q1 least salient)", "", "| run | Q1 | Q2 | Q3 | Q4 | Q5 |", "|---|---|---|---|---|---|",
                  "| pretrained | " + " | ".join(f"{q:.2f}" for q in pre["noised"]["quintiles"]) + " |"]
        for n, seeds in rows:
            lines.append(f"| {n} | " + " | ".join(cell(over_seeds(seeds, lambda r: r["noised"]["quintiles"][q]), ".2f")
                                                 for q in range(5)) + " |")
    return "\n".join(lines) + "\n"


def quality_table(results, names, budgets, get, args):
    """Markdown lines: sample quality per run (classifier accuracy, Fréchet distance), with the
    floor (real against real at the same count) and the base at a second noise seed."""
    pre = results["pretrained"].get("quality")
    if not pre:
        return []
    cols = [(k, c) for c in QUALITY_CFG[::-1] for k in ("accuracy", "fd")]
    seed1 = results.get("pretrained_seed1_quality")
    lines = ["", f"## Sample quality: {pre['1.5']['n']} samples per checkpoint and guidance scale, {args.sample_steps} "
             "Euler steps, labels i % classes", "",
             f"The classifier's accuracy on the samples' labels (real held-out images: "
             f"{results.get('classifier_accuracy', float('nan')):.3f}) and the Fréchet distance in its features to "
             f"held-out images. Floor: {pre['1.5']['floor']:.3f} for as many other real images"
             + (f"; the pretrained model at another noise seed: {seed1['fd']:.3f} (FD), {seed1['accuracy']:.3f} "
                f"(accuracy) against {pre['1.5']['fd']:.3f}, {pre['1.5']['accuracy']:.3f}" if seed1 else "") + ".", "",
             "| budget | run | " + " | ".join(f"{'accuracy' if k == 'accuracy' else 'FD'}, cfg {c:g}" for k, c in cols)
             + " |", "|---|---|" + "---|" * len(cols),
             "| 0 | pretrained | " + " | ".join(format(pre[str(c)][k], ".3f" if k == "accuracy" else ".2f") for k, c in cols)
             + " |"]
    for b in budgets:
        for name in names:
            if b in results["runs"][name]:
                lines.append(f"| {b} | {name} | " + " | ".join(
                    cell(get(name, b, "quality", lambda r, k=k, c=c: r[str(c)][k]), ".3f" if k == "accuracy" else ".2f")
                    for k, c in cols) + " |")
    return lines


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot(panels, path, title, order):
    """Line plots side by side, one PNG. panels: (title, x label, {line: [(x, y), ...]}, x
    log-scaled, y axis from 0); a line's colour follows its place in `order`."""
    W, H, m = 420, 300, 48                                       # panel size, margin for the axes
    labels = [k for k in order if any(k in lines for _, _, lines, _, _ in panels)]
    font = ImageFont.load_default(size=12)
    img = Image.new("RGB", (len(panels) * W + 180, H + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 4), title, fill="black", font=font)
    for p, (name, xlabel, lines, xlog, zero) in enumerate(panels):
        pts = [pt for line in lines.values() for pt in line]
        if not pts:
            continue
        fx = (lambda x: np.log(x)) if xlog else (lambda x: x)
        xs, ys = [fx(x) for x, _ in pts], [y for _, y in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys + [0.0] * zero), max(ys + [0.0] * zero)
        x1, y1 = x1 + (x1 == x0), y1 + (y1 == y0) * 0.01
        if xlabel == "t":
            x0, x1 = x1, x0                                     # denoising runs from t = 1 to 0
        left, top = p * W + m, 30
        X = lambda x: left + (fx(x) - x0) / (x1 - x0) * (W - m - 10)
        Y = lambda y: top + (y1 - y) / (y1 - y0) * (H - m - 10)
        d.rectangle([left, top, left + W - m - 10, top + H - m - 10], outline="black")
        if zero:
            d.line([left, Y(0), left + W - m - 10, Y(0)], fill=(200, 200, 200))
        d.text((left + 4, top + 2), name, fill="black", font=font)
        for v in (y0, y1):
            d.text((p * W + 4, Y(v) - 6), f"{v:+.2f}" if zero else f"{v:.3f}", fill="black", font=font)
        ticks = sorted({x for x, _ in pts})
        if len(ticks) > 6:                                      # a denoising axis: these t, within range
            ticks = [t for t in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0) if min(ticks) - 0.03 <= t <= max(ticks) + 0.03]
        for x in ticks:
            d.line([X(x), top + H - m - 10, X(x), top + H - m - 6], fill="black")
            d.text((X(x) - 8, top + H - m - 4), f"{x:.3g}", fill="black", font=font)
        d.text((left + (W - m) // 2 - 10, top + H - m + 10), xlabel, fill="black", font=font)
        for label, line in lines.items():
            color = PALETTE[order.index(label) % len(PALETTE)]
            line = sorted(line)
            d.line([(X(x), Y(y)) for x, y in line], fill=color, width=2) if len(line) > 1 else None
            for x, y in line:
                d.ellipse([X(x) - 2, Y(y) - 2, X(x) + 2, Y(y) + 2], fill=color)
    for i, label in enumerate(labels):
        color = PALETTE[order.index(label) % len(PALETTE)]
        d.line([len(panels) * W + 8, 40 + 16 * i + 6, len(panels) * W + 28, 40 + 16 * i + 6], fill=color, width=3)
        d.text((len(panels) * W + 32, 40 + 16 * i), label, fill="black", font=font)
    save_image(img, path)


def figures(results, base, args, prefix):
    """Two PNGs: position-controlled correlation per step in each view at the largest budget;
    early-step correlation in each view and held-out loss against the budget (the runs measured
    at two budgets or more)."""
    runs, pre = results["runs"], results["pretrained"]
    b = max([max(r) for r in runs.values() if r] or [0])
    mean = lambda seeds, fn: float(np.mean([fn(s) for s in seeds]))
    panels = []
    for v in VIEWS:
        lines = {"pretrained": list(zip(pre[v]["t"], pre[v]["corr_pos"]))} if v in pre else {}
        for n, by_budget in runs.items():
            seeds = by_budget.get(b, [])
            if seeds and seeds[0].get(v):
                lines[n] = [(t, mean(seeds, lambda r: r[v]["corr_pos"][i])) for i, t in enumerate(seeds[0][v]["t"])]
        panels.append((f"{v}: beyond position, {b} steps", "t", lines, False, True))
    order = ["pretrained", *runs]
    plot(panels, f"{prefix}_steps.png", f"{base['router']}: position-controlled correlation of expert count with "
         f"saliency per denoising step (mean over seeds)", order)
    panels = []
    for v in VIEWS + ("loss",):
        key = "noised" if v == "loss" else v
        fn = (lambda r: float(np.mean(r["noised"]["loss"]))) if v == "loss" else (lambda r: early(r[v]))
        lines = {n: [(bb, mean(s, fn)) for bb, s in sorted(by.items()) if s and s[0].get(key)]
                 for n, by in runs.items() if len(by) > 1 and not (v == "loss" and "oracle" in n)}   # (no sweep)
        panels.append(("held-out loss (mean over t)" if v == "loss" else f"{v}: early steps, beyond position",
                       "post-training steps", {n: l for n, l in lines.items() if l}, True, v != "loss"))
    plot(panels, f"{prefix}_budget.png", f"{base['router']}: against the budget (mean over seeds; "
         "the oracle's loss left out: not comparable)", order)


CLAIM_RUNS = ("control-steps", "control-compute", "dual-only", "paper", "count", "count-nopos", "count-oracle")
TC_RUNS = ("control-steps", "control-compute", "dual-only")   # TC: counts all equal, no routing loss (the paper)


def claim(folder):
    """FOLDER/claim.md, README's table: every ROUTER.json that main wrote into the folder, per
    router and budget: the early-step correlation beyond position in each view, the last step's in
    the noised view, and the held-out loss (mean ± half the range over seeds)."""
    header = ["# The claim, every router measured here", "",
              "Mean ± half the range over seeds. accuracy, FD: the samples' quality (the classifier's "
              "accuracy on their labels; the Fréchet distance in its features, floor in ROUTER.md). "
              f"early, VIEW: the position-controlled correlation of "
              f"expert count with saliency in that view, mean over t >= {sm.EARLY}; t = {sm.PROBE_T[-1]}: the "
              "last noised step; held-out loss: the noised view's flow-matching loss, mean over t (the "
              "oracle's is not comparable: the true x0 reaches the prediction through the routing). The "
              "views and runs: compare.py's docstring; every step: ROUTER.md.", "",
              "| router, steps | measure | pretrained | " + " | ".join(CLAIM_RUNS) + " |",
              "|---|---|" + "---|" * (len(CLAIM_RUNS) + 1)]
    rows = []
    for path in sorted(f for f in os.listdir(folder) if f.endswith(".json")):
        with open(os.path.join(folder, path)) as f:
            results = json.load(f)
        if not isinstance(results, dict) or not {"pretrained", "runs"} <= set(results):
            continue                                            # not one of ours
        router, pre = path[:-5], results["pretrained"]
        measures = [(f"{k}, cfg {c:g}", "quality", lambda r, k=k, c=c: r["quality"][str(c)][k], f)
                    for c in QUALITY_CFG[::-1] for k, f in (("accuracy", ".3f"), ("fd", ".2f")) if "quality" in pre]
        measures += [(f"early, {v}", v, lambda r, v=v: early(r[v]), "+.2f") for v in VIEWS if v in pre]
        measures += [("early, rollout, raw (the paper's)", "rollout", lambda r: early(r["rollout"], "corr"), "+.2f")
                     if "rollout" in pre else None,
                     (f"t = {sm.PROBE_T[-1]}, noised", "noised", lambda r: r["noised"]["corr_pos"][-1], "+.2f"),
                     ("held-out loss", "noised", lambda r: float(np.mean(r["noised"]["loss"])), ".4f"),
                     ("experts / token / layer", "noised",
                      lambda r: float(np.mean(r["noised"]["compute"])) if "compute" in r["noised"] else None, ".2f")]
        measures = [m for m in measures if m]
        for b in sorted({int(b) for by in results["runs"].values() for b in by}):
            for label, v, fn, f in measures:
                seeds = [[pre]] + [results["runs"].get(n, {}).get(str(b), []) for n in CLAIM_RUNS]
                rows.append(f"| {router} {b} | {label} | " + " | ".join(
                    cell(over_seeds([r for r in s if r.get(v)], fn), f) if s else "-" for s in seeds) + " |")
    write_text(os.path.join(folder, "claim.md"), "\n".join(header + rows) + "\n")


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--init", nargs="+", required=True, help="pretrained tc / ec / diffmoe checkpoints (no R_sal), one per router")
    p.add_argument("--reference", default=None, help="a dense model trained on the same data, for the reference view")
    p.add_argument("--out", default="runs/compare", help="folder of the runs and their measurements")
    p.add_argument("--results", default="results", help="folder of the tables and figures (ROUTER.md, .json, .png)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="cpu", help="train.py's --recipe for every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="post-training seeds (a claim needs two or more)")
    p.add_argument("--budgets", type=int, nargs="+", default=[150, 600], help="post-training steps measured")
    p.add_argument("--settings", nargs="+", default=None, help="run only these settings (default: all)")
    p.add_argument("--sweep", action="store_true", help="add the lambda / scope / target sweep at the first budget")
    p.add_argument("--backward", choices=("unrolled", "stepwise"), default="unrolled",
                   help="train.py's --backward (the same gradient; unrolled is faster where memory allows)")
    p.add_argument("--weights", choices=("ema", "model"), default="model",
                   help="which weights are measured (model: what training produced; a short run's EMA lags)")
    p.add_argument("--eval-images", type=int, default=512, help="held-out images of the noised view")
    p.add_argument("--rollout-images", type=int, default=128, help="samples of the rollout and reference views")
    p.add_argument("--sample-steps", type=int, default=50, help="Euler steps of the rollout and reference views")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance of the rollout and reference views "
                   "(sample.py's default, the paper's)")
    p.add_argument("--builtin-size", type=int, default=None, help="built-in training images (default: the base's)")
    p.add_argument("--num-workers", type=int, default=1, help="train.py's data-loader workers")
    p.add_argument("--log-every", type=int, default=150, help="train.py's log and checkpoint interval")
    p.add_argument("--probe-images", type=int, default=256, help="held-out images of each run's logged probe")
    p.add_argument("--measure-only", action="store_true", help="train nothing: measure the snapshots there are")
    p.add_argument("--quality-samples", type=int, default=1000, help="samples per checkpoint and guidance scale (1.0, "
                   "1.5) for the sample quality: the classifier's accuracy on their labels and the Fréchet distance "
                   "in its features (0: none)")
    p.add_argument("--classifier", default=None, help="classifier.py's checkpoint for the quality (default: "
                   "OUT/classifier/, trained once on the base's data)")
    p.add_argument("--compute", type=float, default=1.0, help="DiffMoE: calibrate every checkpoint's thresholds to "
                   "this many experts per token per MoE layer (matched compute; the paper's activated parameters: "
                   "1); 0: as trained")
    args = p.parse_args(argv)
    check_writable(args.out, "--out"), check_writable(args.results, "--results")
    args.budgets = sorted(set(args.budgets))
    args.trajectory_steps = RECIPES[args.recipe]["trajectory_steps"]
    if min(args.budgets) < 1 or len(args.seeds) < 1:
        raise UserError("--budgets must be positive and --seeds must name at least one seed")
    args.bases = []
    for path in args.init:
        ckpt = load_checkpoint(path)
        router = ckpt["config"]["router"]
        if ckpt["config"]["sharpmoe"] or router == "dense":
            raise UserError(f"--init {path} must be a pretrained tc, ec or diffmoe model without R_sal")
        if router in [b["router"] for b in args.bases]:
            raise UserError(f"--init has two {router} models; give one per router")
        a = dict(ckpt["args"], **({"builtin_size": args.builtin_size} if args.builtin_size else {}))
        flags = [f"--{k.replace('_', '-')}" + ("" if a[k] is True else f"={a[k]}")
                 for k in DATA_FLAGS if a.get(k) not in (None, False)]
        args.bases.append(dict(path=path, router=router, args=a, config=sm.Config(**ckpt["config"]), data_flags=flags))
    return args


def main(args):
    """Train, measure, write; one comparison per --out at a time (a lock). SIGTERM (timeout,
    schedulers, kill) ends it as Ctrl-C does: the running train.py is stopped too."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with hold_lock(args.out):
        return compare(args)


def compare(args):
    os.makedirs(args.results, exist_ok=True)
    command = "python compare.py " + " ".join(sys.argv[1:]) if __name__ == "__main__" else "compare.main"
    runs = settings(args)
    # 1. train, the small budgets first
    if not args.measure_only:
        for b, run_name, flags, steps in schedule(args, runs):
            for seed in args.seeds:
                for base in args.bases:
                    if base["router"] != "tc" or run_name in ("control", "dual-only"):
                        train_to(args, base, run_name, flags, seed, steps)
    # 2. measure every snapshot there is, 3. the tables and figures
    out = {}
    for base in args.bases:
        clf = classifier_for(args, base) if args.quality_samples else None
        views = Views(args, base["args"], base["config"], clf)
        results = dict(command=command, pretrained=measured(args, views, base["path"]), runs={})
        if clf:                                                 # the floor's second half: another noise seed
            results["pretrained_seed1_quality"] = seed1_quality(args, views, base["path"])
            results["classifier_accuracy"] = views.classifier[1]["accuracy"]
        for name, run_name, _, factor, last in runs:
            if base["router"] == "tc" and name not in TC_RUNS:
                continue
            for b in args.budgets:
                snaps = [snapshot(args, base, run_name, s, b * factor) for s in args.seeds]
                if b <= last and all(os.path.exists(s) for s in snaps):
                    results["runs"].setdefault(name, {})[b] = [measured(args, views, s, "oracle" in name) for s in snaps]
        prefix = os.path.join(args.results, base["router"])
        write_text(prefix + ".md", tables(results, base, args))
        write_json(prefix + ".json", results)
        figures(results, base, args, prefix)
        print(f"wrote {prefix}.md, {prefix}.json, {prefix}_steps.png, {prefix}_budget.png")
        if clf:
            print(quality_line(results, base))
        out[base["router"]] = results
    claim(args.results)
    print(f"wrote {os.path.join(args.results, 'claim.md')} (every router's results there, one table)")
    return out


if __name__ == "__main__":
    run_cli(main, parse_args)
