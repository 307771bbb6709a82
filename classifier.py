"""
Train the small classifier in whose features sample quality is measured at CPU scale
(quality.py): on the training split of train.py's data, with its held-out accuracy, and its
features of two disjoint sets of held-out images, the reference and the noise floor.

    python classifier.py --out runs/classifier                    # the recipe's data (glyphs, 16x16)
    python fid.py runs/ec/samples/samples.npz --classifier runs/classifier/classifier.pt

Writes OUT/classifier.pt (weights, classes, image size, held-out accuracy, `ref` and `floor`
features, the data flags), atomically. For pixel data only: latent mode has fid.py's FID.
"""
import argparse
import os

import numpy as np
import torch
from tqdm import tqdm

from common import RECIPES, HelpFormatter, UserError, atomic, check_writable, run_cli, to_uint8
from data import BUILTIN, HELD_OUT, data_flags, is_latent_folder, make_datasets
from quality import classify, frechet_distance, statistics, train_classifier


def as_uint8(dataset, n=None, desc="reading"):
    """The first n items of a dataset as uint8 images (n, H, W, 3) and labels (n,)."""
    n = len(dataset) if n is None else min(n, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=500)
    images, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False):
        images.append(to_uint8(x))
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def held_out_sets(args, held_out):
    """(ref, floor): two disjoint held-out sets of --ref-images items (built-in data: far past the
    probe's images; a folder: its held-out split, halved)."""
    if args.data:
        if len(held_out) < 4:
            raise UserError(f"the held-out images ({len(held_out)}) are too few for a reference; pass --val-data")
        images, labels = as_uint8(held_out, desc="held-out images")
        half = len(images) // 2
        return (images[:half], labels[:half]), (images[half:2 * half], labels[half:2 * half])
    make = BUILTIN[args.builtin]
    ref = as_uint8(make(args.image_size, args.ref_images, start=HELD_OUT + 100_000), desc="reference images")
    floor = as_uint8(make(args.image_size, args.ref_images, start=HELD_OUT + 200_000), desc="floor images")
    return ref, floor


def main(args):
    check_writable(args.out, "--out")
    if is_latent_folder(args.data):
        raise UserError(f"--data {args.data} is a latent folder; the classifier measures pixel images "
                        "(latent models: sample.py decodes, fid.py measures with Inception)")
    train_set, held_out = make_datasets(**data_flags(vars(args)))
    images, labels = as_uint8(train_set, desc="training images")
    with tqdm(desc="training the classifier", leave=False) as bar:
        def progress(step, steps, loss):
            bar.total = steps
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        clf = train_classifier(torch.from_numpy(images), torch.from_numpy(labels).long(), len(train_set.classes),
                               epochs=args.epochs, seed=args.seed, progress=progress)
    (ref, ref_y), (floor, _) = held_out_sets(args, held_out)
    ref_feats, preds = classify(clf, ref)
    floor_feats, _ = classify(clf, floor)
    accuracy = float((preds == ref_y).mean())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "classifier.pt")
    with atomic(path) as tmp:
        torch.save(dict(model=clf.state_dict(), classes=list(train_set.classes), image_size=args.image_size,
                        accuracy=accuracy, ref=torch.from_numpy(ref_feats), floor=torch.from_numpy(floor_feats),
                        data=data_flags(vars(args))), tmp)
    mu, sigma = statistics(ref_feats)
    counts = [n for n in (500, 1000, 2000) if n <= len(floor)] or [len(floor)]
    floors = {n: frechet_distance(*statistics(floor_feats[:n]), mu, sigma) for n in counts}
    print(f"wrote {path}: {len(images)} training images, held-out accuracy {accuracy:.3f} on {len(ref)} images; "
          "noise floor (real against real): " + ", ".join(f"{v:.3f} at {n}" for n, v in floors.items()))
    return accuracy


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/classifier", help="output folder")
    p.add_argument("--data", default=None, help="ImageNet-style image folder (default: the built-in data)")
    p.add_argument("--val-data", default=None, help="held-out folder (default: a tenth of --data)")
    p.add_argument("--builtin", choices=tuple(BUILTIN), default=RECIPES["cpu"]["builtin"],
                   help="built-in data without --data (train.py --recipe cpu's)")
    p.add_argument("--builtin-size", type=int, default=10_000, help="built-in training images (train.py's default)")
    p.add_argument("--image-size", type=int, default=RECIPES["cpu"]["image_size"],
                   help="resolution in pixels (train.py --recipe cpu's)")
    p.add_argument("--allow-empty-classes", action="store_true", help="as train.py's")
    p.add_argument("--epochs", type=int, default=4, help="training epochs")
    p.add_argument("--ref-images", type=int, default=5000, help="built-in data: images in each of the reference "
                   "and floor sets")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.ref_images < 2:
        raise UserError("--epochs must be at least 1 and --ref-images at least 2")
    return args


if __name__ == "__main__":
    run_cli(main, parse_args)
