"""
Sample from a checkpoint (Euler, t = 1 -> 0, classifier-free guidance), write an image grid and
an .npz for FID, and the routing-versus-saliency report. Everything about the model comes from
the checkpoint; x0_hat is carried into the router of a SharpMoE model.

    python sample.py --ckpt runs/ec/last.pt                      # OUT/grid.png (250 steps, cfg 1.5)
    python sample.py --ckpt runs/ec/last.pt --num-samples 50000  # OUT/samples.npz (ADM layout)
    torchrun --nproc_per_node=8 sample.py --ckpt runs/ec/last.pt --num-samples 50000
    python sample.py --ckpt runs/ec/last.pt --report rollout     # routing along its own rollout
    python sample.py --ckpt runs/ec/last.pt --report noised      # held-out images, noised
    python sample.py --ckpt runs/ec/last.pt --report reference --reference runs/dense/last.pt

On a GPU sampling runs under bf16 autocast (--precision fp32 for full precision); on a CPU in fp32.
"""
import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import sharpmoe as sm
from common import (HelpFormatter, UserError, check_writable, load_model, load_reference,
                    noise_and_labels, run_cli, save_image, save_npz, setup_distributed, to_uint8,
                    write_json)
from data import data_flags, decode, load_vae, make_datasets, open_folder, probe_batch
from quality import classify, load_classifier


def save_grid(images, path, nrow, labels=None, recognized=None):
    """images: (B, H, W, 3) uint8 -> one PNG with a 2-pixel border; small images are enlarged to
    64 pixels. labels: a name above each column. recognized: (B,) bools, the classifier's verdict
    per image, a green (its class) or red (another) bar under each tile."""
    scale = -(-64 // images.shape[1])
    B, H, W = images.shape[0], images.shape[1] * scale, images.shape[2] * scale
    top, bar = 16 if labels else 0, 0 if recognized is None else 4
    grid = Image.new("RGB", (nrow * (W + 2) + 2, top + -(-B // nrow) * (H + bar + 2) + 2), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default(size=11)
    for j, label in enumerate((labels or [])[:nrow]):
        # (no newlines, tabs)
        label = "".join(c if c.isprintable() else "?" for c in str(label)) or "?"
        while len(label) > 1 and draw.textlength(label, font=font) > W:
            label = label[:-1]
        draw.text((2 + j * (W + 2), 2), label, fill="black", font=font)
    for i, img in enumerate(images):
        tile = Image.fromarray(img).resize((W, H), Image.NEAREST)
        x, y = 2 + (i % nrow) * (W + 2), top + 2 + (i // nrow) * (H + bar + 2)
        grid.paste(tile, (x, y))
        if bar:
            draw.rectangle([x, y + H + 1, x + W - 1, y + H + bar - 1],
                           fill=(40, 160, 60) if recognized[i] else (200, 40, 40))
    save_image(grid, path)


# ----------------------------------------------------------------------------------------------
# The routing report

VIEWS = {"noised": "held-out images noised along one trajectory",
         "rollout": "its own rollout against its final images; counts can cause saliency here",
         "reference": "a dense model's rollout, routed by this model, "
                      "against the dense model's images"}


def colormap(a):
    """(h, w) in [0, 1] -> (h, w, 3) uint8, dark blue -> teal -> yellow."""
    anchors = np.array([[20, 20, 60], [30, 120, 140], [120, 200, 90], [250, 230, 40]], np.float32)
    pos = np.clip(a, 0, 1) * (len(anchors) - 1)
    i = np.minimum(pos.astype(int), len(anchors) - 2)
    f = (pos - i)[..., None]
    return ((1 - f) * anchors[i] + f * anchors[i + 1]).astype(np.uint8)


def report_figure(images, saliency, counts, ts, path, max_count, first="sample", rows=4):
    """Per image: the image, its saliency map, and expert-count maps at several t, on one fixed
    colour scale from 0 to max_count (report: 4x the mean count top_k per MoE layer; counts above
    it take its colour), so that figures of one model's checkpoints compare; saliency is scaled
    per image."""
    B, N = saliency.shape
    g, H = int(N ** 0.5), max(128, images.shape[1])             # tiles of at least 128 pixels
    picks = sm.show_steps(ts)
    titles = [first, "saliency"] + [f"experts, t={float(ts[p]):.2f}" for p in picks]
    font = ImageFont.load_default(size=14)
    top, bar = 24, 40   # title row; colour bar below the rows
    rows = min(rows, B)
    canvas = Image.new("RGB", (len(titles) * (H + 4) + 4, top + rows * (H + 4) + bar), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((4 + j * (H + 4), 4), title, fill="black", font=font)
    for r in range(rows):
        s = saliency[r].view(g, g).numpy()
        tiles = [images[r], colormap(s / max(s.max(), 1e-8))]
        tiles += [colormap(counts[p, r].view(g, g).float().numpy() / max_count) for p in picks]
        for j, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile).resize((H, H), Image.NEAREST),
                         (4 + j * (H + 4), top + r * (H + 4)))
    x0, y0, w = 4 + 2 * (H + 4), top + rows * (H + 4) + 4, 3 * H     # the bar, under the count maps
    canvas.paste(Image.fromarray(colormap(np.linspace(0, 1, w)[None].repeat(12, 0))), (x0, y0))
    for v in (0, max_count // 2, max_count):
        draw.text((x0 + v / max_count * (w - 1) - 4, y0 + 13), str(v), fill="black", font=font)
    draw.text((x0 + w + 10, y0), "experts per token (4x the mean)", fill="black", font=font)
    save_image(canvas, path)


def routing_report(model, x, shown, counts, ts, out, name, ckpt):
    """Print and save (JSON, PNG) the routing-versus-saliency report of counts (K, B, N) at
    steps ts (K,). x: what the model denoises (pixels in [-1, 1], or latents), whose saliency is
    measured; shown: (B, H, W, 3) uint8, the images the figure shows (decoded, for latents)."""
    n_moe = len(model.moe_layers())
    saliency = sm.laplacian_saliency(x.float().cpu(), model.cfg.patch_size)
    counts = counts.cpu()
    r = sm.count_saliency(counts, saliency)
    shown_steps = sm.show_steps(ts)
    report = dict(
        what=name, checkpoint=ckpt, router=model.cfg.router, sharpmoe=model.cfg.sharpmoe,
        images=int(x.shape[0]), moe_layers=n_moe, t=[round(float(t), 4) for t in ts],
        rank_correlation=[round(float(c), 4) for c in r["corr"]],
        position_controlled_correlation=[round(float(c), 4) for c in r["corr_pos"]],
        experts_per_token_per_layer=[round(float(c.float().mean()) / n_moe, 4) for c in counts],
        count_by_saliency_quintile={
            f"t={float(ts[k]):.2f}": [round(float(c), 4)
                                      for c in sm.saliency_quintiles(counts[k], saliency)]
            for k in shown_steps})
    print(f"\nrouting report of {ckpt} "
          f"({model.cfg.router}{' + SharpMoE' if model.cfg.sharpmoe else ''}), {name}: "
          f"{VIEWS[name]}; {report['images']} images, expert count per token summed over "
          f"{n_moe} MoE layers, by saliency quintile (Q1 least salient); rank correlation with "
          "saliency, raw and beyond position")
    print(f"{'t':>8}  " + "  ".join(f"{'Q' + str(q + 1):>6}" for q in range(5)) + "   corr   pos")
    for (k, v), i in zip(report["count_by_saliency_quintile"].items(), shown_steps):
        print(f"{k:>8}  " + "  ".join(f"{c:6.3f}" for c in v)
              + f"  {float(r['corr'][i]):+.2f} {float(r['corr_pos'][i]):+.2f}")
    write_json(os.path.join(out, f"report_{name}.json"), report, indent=1)
    report_figure(shown, saliency, counts, ts, path=os.path.join(out, f"report_{name}.png"),
                  max_count=4 * n_moe * model.cfg.top_k,
                  first="image" if name == "noised" else "sample")
    print(f"wrote {out}/report_{name}.json and {out}/report_{name}.png")
    return report


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="which weights (the paper reports EMA)")
    p.add_argument("--sample-steps", type=int, default=250, help="Euler steps (paper: 250)")
    p.add_argument("--cfg-scale", type=float, default=1.5,
                   help="guidance scale; 1.0 turns guidance off (one pass)")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i uses the seed's generator for item i (common.generator)")
    p.add_argument("--out", default=None, help="output folder (default: CKPT's folder/samples)")
    p.add_argument("--grid", type=int, default=64, help="images in OUT/grid.png (0: none)")
    p.add_argument("--num-samples", type=int, default=0,
                   help="write OUT/samples.npz with this many images")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward, per rank")
    p.add_argument("--report", choices=tuple(VIEWS), default=None,
                   help="write the routing-versus-saliency report "
                        "in this view: " + "; ".join(f"{k}: {v}" for k, v in VIEWS.items()))
    p.add_argument("--report-images", type=int, default=32, help="images in the routing report")
    p.add_argument("--reference", default=None, help="--report reference: the dense checkpoint "
                   "(same data) whose rollout --ckpt routes")
    p.add_argument("--data", default=None, help="--report noised: an image or latent folder "
                   "(default: the held-out images of the checkpoint's data)")
    p.add_argument("--classifier", default=None, help="classifier.py's checkpoint: mark each grid "
                   "tile green or red as it recognizes the tile's class or not")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="bf16 autocast or full fp32 (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--vae", default=None, help="latent checkpoints: the VAE to decode with "
                   "(default: the one its latent folder was made with, "
                   "a local folder or Hugging Face id)")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(os.path.dirname(args.ckpt), "samples")
    for ok, msg in ((args.sample_steps >= 1,
                     f"--sample-steps {args.sample_steps} must be at least 1"),
                    (args.num_samples >= 0, f"--num-samples {args.num_samples} must be 0 or more"),
                    (args.grid >= 0, f"--grid {args.grid} must be 0 (no grid) or more"),
                    (args.batch_size >= 1, f"--batch-size {args.batch_size} must be at least 1"),
                    (args.report_images >= 1,
                     f"--report-images {args.report_images} must be at least 1"),
                    (args.cfg_scale >= 0, f"--cfg-scale {args.cfg_scale} must be 0 or more "
                     "(1: no guidance; paper: 1.5)"),
                    ((args.report == "reference") == bool(args.reference),
                     "--report reference needs --reference DENSE_CKPT, and --reference goes with "
                     "--report reference")):
        if not ok:
            raise UserError(msg)
    check_writable(args.out, "--out")
    return args


def report_images(args, train_args, n, device):
    """The images of a noised-view report: --data, or the held-out images of the checkpoint's
    data; with fixed noise from --seed (data.probe_batch). Returns (x0, y, eps) and the class
    count."""
    if args.data:
        held_out = open_folder(args.data, train_args["image_size"], pairs=False, allow_empty=True)
    else:
        held_out = make_datasets(**data_flags(train_args))[1]
    return probe_batch(held_out, n, args.seed, device), len(held_out.classes)


def report(args, model, train_args, reference, pixels, oracle, device):
    """The routing report of --report's view."""
    cfg = model.cfg
    if args.report == "noised":   # held-out images, one noised trajectory
        (x0, y, eps), n_classes = report_images(args, train_args, args.report_images, device)
        if (n_classes != cfg.num_classes
                or x0.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size)):
            raise UserError(f"--data does not fit the model ({n_classes} classes, "
                            f"inputs {tuple(x0.shape[1:])}; the model: {cfg.num_classes}, "
                            f"{(cfg.in_channels, cfg.image_size, cfg.image_size)})")
        ts = torch.linspace(1, 0, args.sample_steps + 1)[:-1]   # the sampler's steps
        counts = sm.routing_probe(model, x0, y, eps, ts.tolist(), oracle=oracle)["counts"]
        return routing_report(model, x0, pixels(x0), counts, ts, out=args.out, name="noised",
                              ckpt=args.ckpt)
    noise, y = noise_and_labels(range(args.report_images), cfg, args.seed)
    noise, y = noise.to(device), y.to(device)
    if args.report == "reference":   # a dense model's rollout, routed by this one
        x, ts, _, states = sm.rollout_routing(reference, noise, y, args.sample_steps,
                                              args.cfg_scale)
        counts = sm.routing_along(model, states, ts, y, args.cfg_scale, x if oracle else None)
    else:                                                       # along the model's own rollout
        x, ts, counts, _ = sm.rollout_routing(model, noise, y, args.sample_steps, args.cfg_scale)
    return routing_report(model, x, pixels(x), counts, ts.cpu(), out=args.out, name=args.report,
                          ckpt=args.ckpt)


def write_samples(args, model, pixels, rank, world, device):
    """OUT/samples.npz (arr_0 images, arr_1 labels): sample i on rank i % world (a rank past the
    last sample has none), gathered by rank 0."""
    mine = list(range(rank, args.num_samples, world))
    images, labels = [], []
    for start in tqdm(range(0, len(mine), args.batch_size), disable=rank != 0, desc="sampling"):
        noise, y = noise_and_labels(mine[start:start + args.batch_size], model.cfg, args.seed)
        images.append(pixels(sm.sample(model, noise.to(device), y.to(device), args.sample_steps,
                                       args.cfg_scale)))
        labels.append(y.numpy())
    part = lambda r: os.path.join(args.out, f".part{r}.npz")
    if mine:
        save_npz(part(rank), images=np.concatenate(images), labels=np.concatenate(labels))
    if world > 1:
        dist.barrier()
    if rank == 0:
        arr, lab = None, np.zeros(args.num_samples, np.int64)
        for r in range(min(world, args.num_samples)):
            with np.load(part(r)) as f:
                if arr is None:                                 # (decoded size, in latent mode)
                    arr = np.zeros((args.num_samples, *f["images"].shape[1:]), np.uint8)
                arr[r::world], lab[r::world] = f["images"], f["labels"]
            os.remove(part(r))
        save_npz(os.path.join(args.out, "samples.npz"), arr_0=arr, arr_1=lab)
        print(f"wrote {args.out}/samples.npz: arr_0 {arr.shape} uint8, arr_1 labels")


@torch.no_grad()                                               # scoped: no global grad switch
def main(args):
    # 1. the model, its decoder, and what the report needs (checked before any sampling)
    rank, world, device = setup_distributed()
    model, train_args = load_model(args.ckpt, args.weights, device)
    cfg = model.cfg
    oracle = bool(train_args.get("oracle")) and cfg.sharpmoe   # trained to route with the true x0
    if args.report and not model.moe_layers():
        raise UserError("the routing report needs an MoE model; this checkpoint is dense")
    if args.report == "rollout" and oracle:
        raise UserError(f"{args.ckpt} routes with the true image (--oracle); its own rollout has "
                        "none: --report noised or reference")
    reference = (load_reference(args.reference, cfg, args.weights, device) if args.reference
                 else None)
    clf = load_classifier(args.classifier)[0] if args.classifier else None
    os.makedirs(args.out, exist_ok=True)
    decode_latents = lambda x: x   # pixel mode: the model's x is the image
    if train_args.get("latent"):   # latent mode: decode with the data's VAE
        vae, scale = (load_vae(args.vae or train_args["latent"]["vae"], device),
                      train_args["latent"]["scale"])
        if vae.config.scaling_factor != scale:
            raise UserError(f"--vae {args.vae} scales latents by {vae.config.scaling_factor}, "
                            f"the model's latent data by {scale} (its meta.json); "
                            "pass the VAE the data was made with")
        decode_latents = lambda x: decode(vae, x.float())
    pixels = lambda x: to_uint8(decode_latents(x))              # (B, C, h, w) -> (B, H, W, 3) uint8
    if cfg.router == "diffmoe" and rank == 0:
        print("note: DiffMoE's capacity at inference depends on the batch: its samples change "
              "with --batch-size and the number of ranks (not only its compute)")
    bf16 = (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        # 2. the grid: one class per column
        if args.grid and rank == 0:
            noise, _ = noise_and_labels(range(args.grid), cfg, args.seed)
            y = torch.arange(args.grid) % cfg.num_classes
            x = sm.sample(model, noise.to(device), y.to(device), args.sample_steps, args.cfg_scale)
            images, recognized = pixels(x), None
            if clf:                                             # a cheap caption: recognized or not
                recognized = classify(clf, images)[1] == y.numpy()
            save_grid(images, os.path.join(args.out, "grid.png"), min(cfg.num_classes, args.grid),
                      train_args.get("classes"), recognized)
            print(f"wrote {args.out}/grid.png" + ("" if recognized is None else
                  f" ({recognized.mean():.0%} recognized as their class by {args.classifier})"))
        # 3. samples.npz, 4. the routing report
        if args.num_samples:
            write_samples(args, model, pixels, rank, world, device)
        if args.report and rank == 0:
            report(args, model, train_args, reference, pixels, oracle, device)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main, parse_args)
