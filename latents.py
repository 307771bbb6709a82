"""
Latent mode, the paper's own setting: an ImageNet-style folder -> SD-VAE latents of each image
and of its mirror image, which train.py trains on and sample.py decodes.

    python latents.py /imagenet/train data/imagenet256-latents                 # sd-vae-ft-ema, 256px
    python latents.py /imagenet/train data/in256-mse --vae stabilityai/sd-vae-ft-mse
    torchrun --nproc_per_node=8 latents.py /imagenet/train data/imagenet256-latents
    python latents.py /imagenet/val runs/imagenet256-val.npz --fid-batch   # crops for fid.py, no VAE
    python train.py --data data/imagenet256-latents --preset L --router ec --out runs/ec-L

Each image is center-cropped to --image-size as ADM / DiT do, scaled to [-1, 1], and encoded
with the VAE's posterior mean times its scaling factor (0.18215 for SD's VAEs); the mirror
image likewise, so that training flips by picking one. The output folder holds
latents.npy (N, 2, 4, size / 8, size / 8) float16, memory-mapped; labels.npy (N,) int64; and
meta.json (VAE, scale, sizes, class names), written last: a folder without it is incomplete.
A killed extraction resumes where it stopped (done.npy marks finished images) and gives the
same bytes; source.json records what it extracts (the folder, its files, the VAE, the size),
and a resume with anything else is refused. The arrays are allocated on disk at the start (a
disk too small says so then). Under torchrun rank r encodes images r, r + world, ...

--fid-batch writes the center crops themselves, uint8, as an .npz reference batch for fid.py
(arr_0 (N, size, size, 3), and labels): real images cropped exactly as the model's data were.

The VAE comes from diffusers (AutoencoderKL), imported only here: `pip install diffusers`.
Weights: a local folder (--vae PATH), or a Hugging Face id found in the local cache or
downloaded when the machine is online.
"""
import argparse
import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from common import (HelpFormatter, UserError, atomic, check_writable, run_cli, save_npz, setup_distributed, to_uint8,
                    write_error)
from data import VAES, ImageFolder, encode, load_vae


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("data", help="ImageNet-style folder DIR/CLASS/IMAGE")
    p.add_argument("out", help="output latent folder (latents.npy, labels.npy, meta.json), or with --fid-batch an .npz")
    p.add_argument("--vae", default="ema", help="ema (stabilityai/sd-vae-ft-ema), mse, another Hugging Face id, or a local folder")
    p.add_argument("--image-size", type=int, default=256, help="center-crop size in pixels (the paper: 256)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward (each also encoded mirrored)")
    p.add_argument("--num-workers", type=int, default=2, help="image-decoding workers per rank")
    p.add_argument("--fid-batch", action="store_true", help="write OUT.npz: the uint8 center crops (a reference "
                   "batch for fid.py); no VAE")
    p.add_argument("--allow-empty-classes", action="store_true", help="keep class folders without images as classes")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data):
        raise UserError(f"image folder {args.data} does not exist; pass an ImageNet-style folder DIR/CLASS/IMAGE")
    if args.batch_size < 1 or args.image_size < 8:
        raise UserError("--batch-size must be at least 1 and --image-size at least 8")
    if args.fid_batch and not args.out.endswith(".npz"):
        raise UserError(f"--fid-batch writes an .npz file; name OUT like {args.out}.npz")
    if args.fid_batch and os.path.isdir(args.out):
        raise UserError(f"OUT {args.out} is a folder; --fid-batch writes an .npz file")
    check_writable(os.path.dirname(os.path.abspath(args.out)) if args.fid_batch else args.out, "OUT")
    return args


def reference_batch(args):
    """The center crops of args.data as uint8 (N, size, size, 3) in args.out (.npz, arr_0 and labels)."""
    data = ImageFolder(args.data, args.image_size, allow_empty=True)   # (a reference needs no class balance)
    images, labels = [], []
    for x, y in tqdm(DataLoader(data, batch_size=args.batch_size, num_workers=args.num_workers),
                     desc=f"cropping {len(data)} images"):
        images.append(to_uint8(x)), labels.append(y.numpy())
    save_npz(args.out, arr_0=np.concatenate(images), labels=np.concatenate(labels))
    print(f"wrote {args.out}: {len(data)} images {args.image_size}x{args.image_size}, a reference batch for fid.py")


def source(args, data):
    """What an extraction is made of (source.json): a resume must find the same."""
    files = hashlib.sha1(repr([(f, os.path.getsize(f)) for f, _ in data.files]).encode()).hexdigest()
    return dict(data=os.path.abspath(args.data), files=len(data.files), files_sha1=files, image_size=args.image_size,
                vae=os.path.abspath(args.vae) if os.path.isdir(args.vae) else VAES.get(args.vae, args.vae))


def check_source(args, data):
    """Record source.json in a new extraction; refuse to resume one that another source made."""
    path, mine = os.path.join(args.out, "source.json"), source(args, data)
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        differ = [f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in mine.items() if theirs.get(k) != v]
        if differ:
            raise UserError(f"{args.out} holds a partial extraction of another source ({'; '.join(differ)}): "
                            "resuming would mix the two; pick another OUT, or delete it to start over")
        return
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(mine, f, indent=1)


def allocate(path, dtype, shape):
    """A .npy of this shape, its bytes reserved on disk now (a sparse file would die of SIGBUS
    when the disk fills up mid-extraction)."""
    a = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    a.flush()
    del a
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as e:
            os.remove(path)
            raise write_error(path, e) from None


def main(args):
    if args.fid_batch:
        return reference_batch(args)
    if os.path.isfile(os.path.join(args.out, "meta.json")):
        print(f"{args.out} is complete (meta.json exists); nothing to do")
        return
    rank, world, device = setup_distributed()
    data = ImageFolder(args.data, args.image_size, args.allow_empty_classes)
    vae = load_vae(args.vae, device)
    with torch.no_grad():                                       # the latent grid, from one dummy image
        C, s = encode(vae, torch.zeros(1, 3, args.image_size, args.image_size, device=device)).shape[1:3]
    N, paths = len(data), {f: os.path.join(args.out, f) for f in ("latents.npy", "labels.npy", "done.npy")}
    if rank == 0:                                               # allocate (or reopen) the memory-mapped arrays
        os.makedirs(args.out, exist_ok=True)
        check_source(args, data)
        for name, dtype, shape in (("latents.npy", np.float16, (N, 2, C, s, s)), ("labels.npy", np.int64, (N,)),
                                   ("done.npy", np.bool_, (N,))):
            if not os.path.exists(paths[name]):
                allocate(paths[name], dtype, shape)
    if world > 1:
        dist.barrier()
    latents, labels, done = (np.load(paths[f], mmap_mode="r+") for f in ("latents.npy", "labels.npy", "done.npy"))
    if latents.shape != (N, 2, C, s, s):
        raise UserError(f"{args.out} holds an extraction of another data folder, size or VAE "
                        f"({latents.shape}, now {(N, 2, C, s, s)}); pick another output folder")
    todo = [i for i in range(rank, N, world) if not done[i]]
    loader = DataLoader(Subset(data, todo), batch_size=args.batch_size, num_workers=args.num_workers)
    for b, (x, y) in enumerate(tqdm(loader, disable=rank != 0, desc=f"encoding {len(todo)} images")):
        idx = todo[b * args.batch_size:(b + 1) * args.batch_size]
        z = encode(vae, torch.cat([x, x.flip(-1)]).to(device)).float().cpu().numpy()   # images, then mirrors
        bad = [data.files[idx[i % len(idx)]][0] for i in np.flatnonzero(~np.isfinite(z).reshape(len(z), -1).all(1))]
        if bad or not np.isfinite(z.astype(np.float16)).all():  # (float16 overflows past 65504)
            raise UserError(f"the VAE gives latents that are not numbers (NaN or inf) for {bad[0] if bad else 'an image'} "
                            "(check the image and the VAE); nothing of this batch was written", rank_local=True)
        latents[idx] = np.stack([z[:len(idx)], z[len(idx):]], 1).astype(np.float16)   # (B, 2, C, s, s)
        labels[idx] = y.numpy()
        latents.flush(), labels.flush()
        done[idx] = True                                        # only after the latents are on disk
        done.flush()
    if world > 1:
        dist.barrier()
    if rank == 0:
        meta = dict(vae=os.path.abspath(args.vae) if os.path.isdir(args.vae) else VAES.get(args.vae, args.vae),
                    scale=float(vae.config.scaling_factor), image_size=args.image_size, latent_size=int(s),
                    channels=int(C), count=N, classes=list(data.classes))
        with atomic(os.path.join(args.out, "meta.json")) as tmp, open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        print(f"wrote {args.out}: latents {latents.shape} float16, {len(data.classes)} classes")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main, parse_args)
