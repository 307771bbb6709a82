"""
The CPU recipe sweep: which built-in data, image size, model, steps, batch, lr and EMA give
pretrained models whose samples the classifier recognizes as their class (the bar: 80% at cfg
1.5), measured as compare.py measures quality. Each setting is one train.py run (pretraining)
measured at several step counts; rerunning resumes what was killed and skips what was measured.

    python sweep.py                                  # every setting's EC run, results/sweep.md
    python sweep.py --settings recipe --routers diffmoe dense tc

Per setting and step count: the loss is train.py's logged training loss (log.txt); the
quality is quality.model_quality of the EMA weights (--samples samples, labels i % 10, 50
Euler steps, cfg 1.5 and 1.0): the classifier's accuracy on the labels, the Fréchet distance
in its features to held-out images, and its noise floor (as many other real images). Each
setting's data gets its own classifier (classifier.py, cached in OUT/classifiers/). A grid of
each measured snapshot's first samples goes beside the table (results/sweep/).
"""
import argparse
import json
import os
import subprocess
import sys


from common import (RECIPES, HelpFormatter, UserError, atomic, cached, check_writable, load_checkpoint, load_model,
                    run_cli, save_image, write_text)
from quality import load_classifier, model_quality

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (train.py flags beyond --recipe cpu, the step counts measured). "before": the recipe the
# sweep started from (the quick start's until then: thin strokes at 32x32, patch 4, lr 3e-4).
SETTINGS = {
    "before": (["--builtin", "strokes", "--image-size", "32", "--patch-size", "4", "--lr", "3e-4", "--warmup", "0",
                "--t-sampling", "uniform"], (3000,)),
    "uniform-t": (["--t-sampling", "uniform"], (3000, 6000)),
    "recipe": ([], (3000, 6000, 9000, 12000)),
    "x-prediction": (["--predict", "x"], (3000, 6000, 9000, 12000)),
    "cosine-6000": (["--lr-schedule", "cosine"], (6000,)),      # (the schedule ends at its one budget)
}
ROUTERS = ("ec", "diffmoe", "dense", "tc")

def classifier_for(args, flags):
    """The classifier of a setting's data (built-in name and image size), trained once (or
    --classifier)."""
    if args.classifier:
        return args.classifier
    recipe = RECIPES["cpu"]
    pick = lambda k, default: flags[flags.index(k) + 1] if k in flags else str(default)
    builtin, size = pick("--builtin", recipe["builtin"]), pick("--image-size", recipe["image_size"])
    path = os.path.join(args.out, "classifiers", f"{builtin}-{size}", "classifier.pt")
    if not os.path.exists(path):
        run([sys.executable, os.path.join(HERE, "classifier.py"), "--builtin", builtin, "--image-size", size,
             "--out", os.path.dirname(path)], f"classifier.py for {builtin} at {size}px")
    return path


def run(cmd, what):
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except BaseException:                                      # Ctrl-C, SIGTERM: no orphan
        proc.terminate()
        proc.wait()
        raise
    if code:
        raise UserError(f"{what} failed (the lines above say why); rerun this command to continue")


def train_to(args, name, router, flags, steps):
    """OUT/NAME/ROUTER/stepN.pt: the run continued (or started) up to `steps`, then copied."""
    out = os.path.join(args.out, name, router)
    snap, last = os.path.join(out, f"step{steps}.pt"), os.path.join(out, "last.pt")
    if os.path.exists(snap):
        return snap
    at = load_checkpoint(last)["step"] if os.path.exists(last) else 0
    if at < steps:
        print(f"\n== {name}, {router}: steps {at} -> {steps}", flush=True)
        run([sys.executable, os.path.join(HERE, "train.py"), "--recipe", "cpu", "--router", router, *flags,
             "--steps", str(steps), "--out", out, "--num-workers", "1", *(["--resume", last] if at else [])],
            f"train.py in {out}")
    with atomic(snap) as tmp, open(last, "rb") as src, open(tmp, "wb") as dst:
        dst.write(src.read())
    return snap


def last_loss(log, steps):
    """train.py's logged loss_fm at this step (the mean since the previous log line)."""
    for line in open(log):
        if line.startswith(f"step {steps:7d}  loss_fm"):
            return float(line.split()[3])
    return None


def measure(args, snap, clf_path):
    """Quality at cfg 1.5 and 1.0, cached beside the snapshot (.json), and a grid."""
    key = dict(samples=args.samples, sample_steps=args.sample_steps, classifier=os.path.abspath(clf_path))

    def compute():
        model, _ = load_model(snap, "ema")
        clf, ckpt = load_classifier(clf_path)
        quality = {}
        for cfg_scale in (1.5, 1.0):
            q = model_quality(model, clf, ckpt, n=args.samples, steps=args.sample_steps, cfg_scale=cfg_scale)
            images = q.pop("images")
            if cfg_scale == 1.5:
                grid(images[:40], snap[:-3] + ".png")
            quality[str(cfg_scale)] = q
        return quality
    return cached(snap[:-3] + ".quality.json", key, compute)


def grid(images, path):
    """4 rows of 10 (one class per column), enlarged: a look at the samples."""
    from PIL import Image
    H, W = images.shape[1:3]
    scale = max(1, 48 // H)
    canvas = Image.new("RGB", (10 * (W * scale + 2) + 2, 4 * (H * scale + 2) + 2), "white")
    for i, img in enumerate(images):
        tile = Image.fromarray(img).resize((W * scale, H * scale), Image.NEAREST)
        canvas.paste(tile, (2 + (i % 10) * (W * scale + 2), 2 + (i // 10) * (H * scale + 2)))
    save_image(canvas, path)


def table(rows, args):
    lines = ["# The CPU recipe sweep", "",
             f"Made by `python sweep.py --settings {' '.join(dict.fromkeys(r[0] for r in rows))} --routers "
             f"{' '.join(dict.fromkeys(r[2] for r in rows))}` (train.py --recipe cpu plus each setting's flags; "
             "pretraining; a row exists where that run was measured). "
             f"Quality of the EMA weights: {args.samples} samples (labels i % 10), {args.sample_steps} "
             "Euler steps; accuracy = the share the setting's classifier (classifier.py, trained on that data) "
             "recognizes as their label; FD = Fréchet distance in its features to 5000 held-out images; floor = "
             "the same for as many other real images. Loss: train.py's logged loss_fm at that step.", "",
             "| setting | flags | router | steps | loss | accuracy, cfg 1.5 | FD, cfg 1.5 | accuracy, cfg 1.0 | FD, cfg 1.0 "
             "| floor | samples |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, flags, router, steps, loss, q, png in rows:
        a, b = q["1.5"], q["1.0"]
        lines.append(f"| {name} | `{' '.join(flags) or '(none)'}` | {router} | {steps} | "
                     f"{'-' if loss is None else format(loss, '.4f')} | {a['accuracy']:.3f} | {a['fd']:.2f} | "
                     f"{b['accuracy']:.3f} | {b['fd']:.2f} | {a['floor']:.3f} | [grid](sweep/{png}) |")
    return "\n".join(lines) + "\n"


def measured_rows(args):
    """Every (setting, router, steps) measured so far in OUT, by this process or another: the
    table's rows (so that two sweeps over disjoint --settings share one table)."""
    rows = []
    for name, (flags, budgets) in SETTINGS.items():
        for router in ROUTERS:
            for steps in budgets:
                snap = os.path.join(args.out, name, router, f"step{steps}.pt")
                if os.path.exists(snap[:-3] + ".quality.json"):
                    with open(snap[:-3] + ".quality.json") as f:
                        saved = json.load(f)
                    q = saved.get("value", saved.get("quality"))
                    loss = last_loss(os.path.join(os.path.dirname(snap), "log.txt"), steps)
                    rows.append((name, flags, router, steps, loss, q, f"{name}-{router}-{steps}.png"))
    return rows


def main(args):
    for name in args.settings:
        flags, budgets = SETTINGS[name]
        clf = classifier_for(args, flags)
        for router in args.routers:
            for steps in budgets:
                snap = train_to(args, name, router, flags, steps)
                q = measure(args, snap, clf)
                png = os.path.join(args.results, "sweep", f"{name}-{router}-{steps}.png")
                os.makedirs(os.path.dirname(png), exist_ok=True)
                with atomic(png) as tmp, open(snap[:-3] + ".png", "rb") as src, open(tmp, "wb") as dst:
                    dst.write(src.read())
                write_text(os.path.join(args.results, "sweep.md"), table(measured_rows(args), args))
                print(f"{name} {router} {steps}: accuracy {q['1.5']['accuracy']:.3f} (cfg 1.5), "
                      f"{q['1.0']['accuracy']:.3f} (cfg 1.0)", flush=True)
    print(f"wrote {args.results}/sweep.md")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="settings to run")
    p.add_argument("--routers", nargs="+", default=["ec"], choices=ROUTERS,
                   help="routers to pretrain per setting")
    p.add_argument("--out", default="runs/sweep", help="runs and their measurements")
    p.add_argument("--results", default="results", help="sweep.md and its grids (sweep/)")
    p.add_argument("--samples", type=int, default=500, help="samples per measurement and guidance scale")
    p.add_argument("--sample-steps", type=int, default=50, help="Euler steps per sample")
    p.add_argument("--classifier", default=None, help="classifier.py's checkpoint for every setting (default: one "
                   "trained per setting's data, in OUT/classifiers/)")
    args = p.parse_args(argv)
    check_writable(args.out, "--out"), check_writable(args.results, "--results")
    return args


if __name__ == "__main__":
    run_cli(main, parse_args)
