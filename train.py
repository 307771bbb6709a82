"""
Pretrain a DiT-MoE, or post-train one with SharpMoE, on the CPU, one GPU, or under torchrun.

    python train.py --preset cpu --router ec --global-batch-size 32 --lr 3e-4 --steps 3000 \
        --ema 0.999 --out runs/ec                                        # pretraining on a CPU
    python train.py --init runs/ec/last.pt --out runs/ec-sharpmoe       # SharpMoE post-training
    python train.py --init runs/ec/last.pt --sharpmoe off --out runs/ec-control   # its control
    torchrun --nproc_per_node=8 train.py --preset L --router diffmoe --data /imagenet/train

Defaults are the paper's recipe where it gives one (AdamW lr 1e-4, batch 256, EMA 0.9999,
T = 10, lambda = 0.001, 500K / 100K steps); README gives the small CPU settings. A killed run
continues with the same command plus --resume OUT/last.pt.
"""
import argparse
import itertools
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from copy import copy, deepcopy
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import sharpmoe as sm
from fid import IMAGE_EXTENSIONS, HelpFormatter, UserError    # fid.py stands alone; they live there


# ----------------------------------------------------------------------------------------------
# Data

HELD_OUT = 10 ** 9      # built-in images from this index on are never trained on (probe, reports)
PROBE_IMAGES = 256      # held-out images of the routing probe


class Builtin(Dataset):
    """Built-in data, drawn deterministically from the image index (nothing to download):
    images start .. start + n - 1, 10 classes, pixels in [-1, 1]."""
    classes = ()

    def __init__(self, size=32, n=10_000, start=0):
        self.size, self.n, self.start = size, n, start

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i += self.start
        rng = np.random.default_rng([self.key, i])
        u = (np.arange(self.size) + 0.5) / self.size * 2 - 1       # pixel centres in [-1, 1]
        img = self.draw(i % 10, rng, *np.meshgrid(u, u))           # (H, W, 3)
        return torch.from_numpy(img).permute(2, 0, 1).float(), i % 10


class Shapes(Builtin):
    """One flat-colored shape on a flat background, near the centre: sharp edges and flat
    regions. Easy: a router that sends experts to the centre already follows its saliency."""
    key = 0
    classes = ("disk", "square", "triangle", "ring", "h-stripes", "v-stripes", "checker",
               "cross", "diamond", "two-disks")

    def draw(self, y, rng, X, Y):
        r, cx, cy = rng.uniform(0.35, 0.65), *rng.uniform(-0.3, 0.3, 2)
        dx, dy, f = X - cx, Y - cy, rng.uniform(0.25, 0.5)         # (H, W) offsets from center
        box = (abs(dx) < r) & (abs(dy) < r)
        band = lambda a: np.floor((a + r) / (f * r)) % 2 == 0      # stripes of width f * r
        inside = [dx ** 2 + dy ** 2 < r ** 2, box, (dy < r) & (abs(dx) < (dy + r) / 2),
                  (dx ** 2 + dy ** 2 < r ** 2) & (dx ** 2 + dy ** 2 > (f * r) ** 2),
                  box & band(dy), box & band(dx), box & (band(dx) ^ band(dy)),
                  ((abs(dx) < f * r) | (abs(dy) < f * r)) & box, abs(dx) + abs(dy) < r,
                  ((dx - r / 2) ** 2 + dy ** 2 < (r / 2.5) ** 2) | ((dx + r / 2) ** 2 + dy ** 2 < (r / 2.5) ** 2)][y]
        bg = rng.uniform(0, 1, 3)
        fg = (bg + rng.uniform(0.35, 0.65, 3)) % 1.0               # always a visible contrast
        return np.where(inside[..., None], fg, bg) * 2 - 1


class Strokes(Builtin):
    """Closer to real images: a thin-stroke glyph (the class) placed anywhere near the centre at
    any angle, and a small textured patch anywhere, on a smooth, low-contrast background (a
    colour, a gentle gradient, a broad blob). Most tokens are smooth; the salient ones are few,
    thin and not where a positional prior would put them."""
    key = 1
    classes = ("line", "two-lines", "cross", "ring", "arc", "zigzag", "triangle", "tee", "spiral", "wave")

    @staticmethod
    def glyph(y):
        """Class y's strokes as line segments (S, 2, 2) in a unit box."""
        t = np.linspace(0, 1, 17)
        line = lambda xs, ys: np.stack([np.stack([xs[:-1], ys[:-1]], -1), np.stack([xs[1:], ys[1:]], -1)], 1)
        a = lambda *v: np.array(v, dtype=float)
        arc = lambda a0, a1: line(np.cos(a0 + (a1 - a0) * t), np.sin(a0 + (a1 - a0) * t))
        return [line(a(-1, 1), a(0, 0)),
                np.concatenate([line(a(-1, 1), a(-.4, -.4)), line(a(-1, 1), a(.4, .4))]),
                np.concatenate([line(a(-1, 1), a(-1, 1)), line(a(-1, 1), a(1, -1))]),
                arc(0, 2 * np.pi), arc(0.6, 2 * np.pi - 0.6),
                line(np.linspace(-1, 1, 6), a(-.5, .5, -.5, .5, -.5, .5)),
                line(a(-1, 1, 0, -1), a(-.8, -.8, .9, -.8)),
                np.concatenate([line(a(-1, 1), a(-.9, -.9)), line(a(0, 0), a(-.9, 1))]),
                line(np.cos(4 * np.pi * t) * (.2 + .8 * t), np.sin(4 * np.pi * t) * (.2 + .8 * t)),
                line(2 * t - 1, 0.5 * np.sin(3 * np.pi * t))][y]

    def draw(self, y, rng, X, Y):
        bg = rng.uniform(-0.6, 0.6, 3)
        g = rng.normal(size=2)
        g *= rng.uniform(0.05, 0.2) / np.linalg.norm(g)            # a gentle linear gradient
        bx, by = rng.uniform(-1, 1, 2)
        blob = np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / rng.uniform(0.3, 0.8))
        img = bg + (g[0] * X + g[1] * Y)[..., None] + blob[..., None] * rng.uniform(-0.15, 0.15, 3)
        a = rng.uniform(0, 2 * np.pi)                              # the glyph: rotated, scaled, placed
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        seg = self.glyph(y) @ rot.T * rng.uniform(0.25, 0.5) + rng.uniform(-0.35, 0.35, 2)
        P, p0, d = np.stack([X, Y], -1)[None], seg[:, None, None, 0], (seg[:, 1] - seg[:, 0])[:, None, None]
        s = np.clip(((P - p0) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0, 1)   # (S, H, W)
        dist = np.linalg.norm(P - p0 - s[..., None] * d, axis=-1).min(0) * self.size / 2   # in pixels
        ink = np.clip(1.5 - dist, 0, 1)[..., None]                 # about 2 px wide, antialiased
        color = bg + rng.choice([-1, 1]) * rng.uniform(0.4, 0.8) + rng.uniform(-0.2, 0.2, 3)
        img = img * (1 - ink) + color * ink
        w = rng.integers(4, 8)                                     # a small textured patch
        px, py = rng.integers(0, self.size - w, 2)
        tex = (np.add.outer(np.arange(w), np.arange(w)) % 2) if rng.random() < 0.5 else rng.random((w, w))
        img[py:py + w, px:px + w] += (tex[..., None] - 0.5) * rng.uniform(0.3, 0.6)
        return np.clip(img, -1, 1)


BUILTIN = {"strokes": Strokes, "shapes": Shapes}


def center_crop(img, size):
    """ADM / DiT preprocessing: halve with BOX while the short side is >= 2x the target, resize
    the short side to `size` with BICUBIC, then crop the center."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """An ImageNet-style folder: DIR/CLASS/IMAGE, classes in sorted order."""

    def __init__(self, root, size):
        if not os.path.isdir(root):
            raise UserError(f"data folder {root} does not exist; pass --data DIR with one "
                            "subfolder per class, or leave --data out for the built-in data")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.files = [(os.path.join(root, c, f), y) for y, c in enumerate(self.classes)
                      for f in sorted(os.listdir(os.path.join(root, c)))
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.files:
            raise UserError(f"data folder {root} has no images in class subfolders; expected "
                            f"{root}/CLASS/IMAGE.jpg")
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path, y = self.files[i]
        try:
            img = Image.open(path).convert("RGB")
        except Exception as e:
            raise UserError(f"cannot read image {path} ({type(e).__name__}); fix or remove it")
        arr = np.asarray(center_crop(img, self.size), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(arr).permute(2, 0, 1), y

    def split_off(self, n):
        """Hold out n images (every k-th file, so all classes): removed from this set, returned
        as another."""
        held, k = copy(self), max(len(self.files) // n, 2)
        held.files = self.files[::k][:n]
        self.files = [f for i, f in enumerate(self.files) if i % k or i // k >= n]
        return held


class LatentFolder(Dataset):
    """A latent folder written by latents.py (latent mode). Items: (latents, label) with latents (2, C, s, s) float32,
    the image's and its mirror's (pairs=True, for training), or the image's (C, s, s)."""

    def __init__(self, root, pairs=True):
        meta_path = os.path.join(root, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"latent folder {root} has no meta.json: its extraction did not finish; "
                            f"rerun latents.py into it to complete it")
        with open(meta_path) as f:
            self.meta = json.load(f)
        try:
            self.latents = np.load(os.path.join(root, "latents.npy"), mmap_mode="r")
            self.labels = np.load(os.path.join(root, "labels.npy"), mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"latent folder {root}: cannot read latents.npy / labels.npy ({type(e).__name__}); "
                            "rerun latents.py into a new folder")
        m, shape = self.meta, (self.meta["count"], 2, self.meta["channels"], self.meta["latent_size"], self.meta["latent_size"])
        if self.latents.shape != shape or self.labels.shape != (m["count"],) or \
                (m["count"] and int(self.labels.max()) >= len(m["classes"])):
            raise UserError(f"latent folder {root}: the arrays disagree with meta.json (latents {self.latents.shape}, "
                            f"labels {self.labels.shape}, {len(m['classes'])} classes; meta says {shape}); "
                            "rerun latents.py into a new folder")
        self.classes, self.pairs = m["classes"], pairs
        self.index = np.arange(m["count"])

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        j = self.index[i]
        x = torch.from_numpy(self.latents[j].astype(np.float32))   # (2, C, s, s)
        return (x if self.pairs else x[0]), int(self.labels[j])

    def split_off(self, n):
        """Hold out n items (every k-th): removed from this set, returned as another (single latents)."""
        held, k = copy(self), max(len(self.index) // n, 2)
        held.pairs, held.index = False, self.index[::k][:n]
        self.index = np.array([j for i, j in enumerate(self.index) if i % k or i // k >= n], dtype=np.int64)
        return held


def is_latent_folder(path):
    return path is not None and any(os.path.exists(os.path.join(path, f)) for f in ("meta.json", "latents.npy"))


def make_datasets(args):
    """(training set, held-out set): --data and --val-data (or a tenth of --data, at most
    PROBE_IMAGES images, split off), or the built-in data and 1024 of its held-out images.
    --data may be an image folder or a latent folder (latents.py)."""
    if not args.data:
        make = BUILTIN[args.builtin]
        return make(args.image_size, args.builtin_size), make(args.image_size, 1024, start=HELD_OUT)
    latent = is_latent_folder(args.data)
    data = LatentFolder(args.data) if latent else ImageFolder(args.data, args.image_size)
    if args.val_data:
        held_out = LatentFolder(args.val_data, pairs=False) if latent else ImageFolder(args.val_data, args.image_size)
    else:                                                      # a tenth, at most PROBE_IMAGES
        held_out = data.split_off(max(1, min(PROBE_IMAGES, len(data) // 10)))
    if held_out.classes != data.classes:
        raise UserError(f"--val-data {args.val_data} has other classes than --data {args.data}; "
                        "give it the same class subfolders")
    return data, held_out


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (for an exact --resume)."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def batches(loader, step, steps_per_epoch):
    """Endless batches, starting at global step `step` of a deterministic epoch order."""
    epoch, skip = divmod(step, steps_per_epoch)
    while True:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = skip * loader.batch_size
        yield from loader
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# Helpers

def setup_distributed():
    """torchrun sets RANK; without it this is one process on a GPU or the CPU."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def load_checkpoint(path):
    """A checkpoint of train.py, loaded with weights_only=True (a checkpoint must not run code)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                     # truncated, random bytes, a pickle with code
        raise UserError(f"{path} is not a readable train.py checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:80]}); it may be truncated or another kind of file")
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise UserError(f"{path} is not a train.py checkpoint (it has no model weights and config)")
    return ckpt


def checkpoint_config(ckpt, path):
    """The model config stored with the weights (a clear error for another version's checkpoint)."""
    unknown = sorted(set(ckpt["config"]) - {f.name for f in fields(sm.Config)})
    if unknown:
        raise UserError(f"{path} was written by another version of sharpmoe (config fields unknown here: "
                        f"{', '.join(unknown)}); retrain, or use the version that wrote it")
    return sm.Config(**ckpt["config"])


def load_weights(model, state, path):
    """load_state_dict, with the mismatching names in one line instead of a traceback."""
    mine = model.state_dict()
    bad = sorted(set(mine) ^ set(state)) + [k for k in mine if k in state and mine[k].shape != state[k].shape]
    if bad:
        raise UserError(f"{path} does not fit this model (first mismatching weights: {', '.join(bad[:3])}); "
                        "it was written by another config or another version of sharpmoe")
    model.load_state_dict(state)


def save_checkpoint(path, ckpt):
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):           # DiffMoE thresholds
        e.copy_(b)


def data_shape(data, args):
    """(channels, size) of what the model denoises: RGB pixels at --image-size, or a latent
    folder's latents (its meta.json decides; --image-size is not used)."""
    if isinstance(data, LatentFolder):
        return data.meta["channels"], data.meta["latent_size"]
    return 3, args.image_size


def build_models(args, data, device):
    """(model, ema). Pretraining: a fresh model from --preset. Post-training: weights and EMA
    from --init, plus zero-initialized R_sal when --sharpmoe on."""
    (channels, size), num_classes = data_shape(data, args), len(data.classes)
    if args.init is None:
        cfg = sm.make_config(args.preset, router=args.router, num_experts=args.num_experts, top_k=args.top_k,
                             moe_every=args.moe_every, class_dropout=args.class_dropout,
                             threshold_decay=args.threshold_decay, image_size=size, in_channels=channels,
                             num_classes=num_classes)
        model = sm.DiT(cfg)
        return model.to(device), deepcopy(model).to(device)
    ckpt = load_checkpoint(args.init)
    cfg = checkpoint_config(ckpt, args.init)
    if cfg.sharpmoe and args.sharpmoe == "off":
        raise UserError(f"--init {args.init} is already a SharpMoE model; the control (--sharpmoe off) "
                        "starts from the pretrained base checkpoint")
    if (cfg.in_channels, cfg.image_size, cfg.num_classes) != (channels, size, num_classes):
        raise UserError(f"--init {args.init} is for {cfg.in_channels}x{cfg.image_size}x{cfg.image_size} inputs and "
                        f"{cfg.num_classes} classes, the data has {channels}x{size}x{size} and "
                        f"{num_classes}; pass the matching --image-size and --data")
    cfg.sal_hidden = args.sal_hidden
    model = sm.DiT(cfg)
    load_weights(model, ckpt["model"], args.init)
    if args.sharpmoe == "on" and not cfg.sharpmoe:
        sm.add_saliency_routers(model)
    ema = deepcopy(model)                                      # R_sal starts equal in both
    incompatible = ema.load_state_dict(ckpt["ema"], strict=False)
    assert not incompatible.unexpected_keys and all("sal_router" in k for k in incompatible.missing_keys)
    return model.to(device), ema.to(device)


def apply_flip(x0, flip):
    """Random horizontal flips: pixels (B, C, H, W) are mirrored; latent pairs (B, 2, C, s, s)
    give their mirror image's latents (a flipped latent is not the latent of the flipped image)."""
    if x0.dim() == 5:
        return torch.where(flip.view(-1, 1, 1, 1), x0[:, 1], x0[:, 0])
    return torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)


def step_noise(args, cfg, T, step, rank, world, device):
    """The flips and the training noise of one step. Every rank draws them for the whole global
    batch from the same seed and keeps its own rows (rank r holds the batch's rows r, r + world,
    ..., as DistributedSampler deals the images), so a run does not depend on the number of ranks
    and a resumed run draws what the uninterrupted one drew."""
    g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step)
    G, rows = args.global_batch_size, slice(rank, None, world)
    ts, eps, drop = sm.training_noise(cfg, G, T, g, device, args.logit_normal)
    flip = torch.rand(G, generator=g, device=device) < 0.5
    return flip[rows], (ts[:, rows], eps[rows], drop[rows])


class RoutingProbe:
    """sm.routing_probe on fixed held-out images and noise, so that every run (pretraining,
    SharpMoE, controls) logs the same per-step measurements. Rank 0 only."""
    LOG_T = (0.999, 0.95, 0.8, 0.5, 0.2, 0.05)                 # the steps the log shows

    def __init__(self, held_out, device, n=PROBE_IMAGES):
        images = [held_out[i] for i in range(min(n, len(held_out)))]
        self.x0 = torch.stack([x for x, _ in images]).to(device)
        self.y = torch.tensor([y for _, y in images], device=device)
        self.eps = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(0)).to(device)

    def __call__(self, model):
        r = sm.routing_probe(model, self.x0, self.y, self.eps)
        show = [sm.PROBE_T.index(t) for t in self.LOG_T]
        row = lambda v, f: "/".join(format(v[i], f) for i in show)
        return (f"probe t={row(sm.PROBE_T, '.3g')}: corr {row(r['corr'].tolist(), '+.2f')} "
                f"pos {row(r['corr_pos'].tolist(), '+.2f')} loss {row(r['loss'].tolist(), '.3f')}")


def position_saliency(data, patch_size, n=2048, batch=256):
    """The training data's mean Laplacian saliency at each token position, (N,), over n images
    spread over the set, each as training sees it both ways (pixels and their flip, or a latent
    pair: the image's and its mirror's): the residual routing target's baseline."""
    idx = np.linspace(0, len(data) - 1, min(n, len(data))).round().astype(int)
    total, views = 0.0, 0
    for start in range(0, len(idx), batch):
        x0 = torch.stack([data[int(i)][0] for i in idx[start:start + batch]])
        x0 = x0.flatten(0, 1) if x0.dim() == 5 else torch.cat([x0, x0.flip(-1)])   # (2B, C, H, W)
        total, views = total + sm.laplacian_saliency(x0, patch_size).sum(0), views + len(x0)
    return total / views


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", default=None, help="ImageNet-style folder DIR/CLASS/IMAGE, or a latent folder made by "
                   "latents.py (default: the built-in data, --builtin)")
    p.add_argument("--image-size", type=int, default=32, help="training resolution in pixels (a latent folder sets its own)")
    p.add_argument("--builtin", choices=tuple(BUILTIN), default="strokes", help="built-in data when --data is not given")
    p.add_argument("--builtin-size", type=int, default=10_000, help="number of built-in training images")
    p.add_argument("--val-data", default=None, help="held-out folder for the routing probe (default: "
                   f"{PROBE_IMAGES} images split off --data; built-in data has its own held-out range)")
    p.add_argument("--preset", default="L", help=f"model size, one of {', '.join(sm.PRESETS)} (ignored with --init)")
    p.add_argument("--router", default="ec", help=f"one of {', '.join(sm.ROUTERS)} (ignored with --init)")
    p.add_argument("--num-experts", type=int, default=0, help="experts per MoE layer (0: 16 for diffmoe, 8 otherwise)")
    p.add_argument("--top-k", type=int, default=1, help="experts per token on average (paper: 1; ignored with --init)")
    p.add_argument("--moe-every", type=int, default=2, help="an MoE layer in every n-th block (paper: 2; ignored with --init)")
    p.add_argument("--class-dropout", type=float, default=0.1, help="label dropout for CFG (ignored with --init)")
    p.add_argument("--threshold-decay", type=float, default=0.95, help="DiffMoE threshold EMA (ignored with --init)")
    p.add_argument("--init", default=None, help="post-train from this pretrained checkpoint (weights and EMA)")
    p.add_argument("--sharpmoe", choices=("on", "off"), default="on",
                   help="with --init: on adds R_sal and trains on trajectories; off is the control (plain continuation)")
    p.add_argument("--trajectory-steps", type=int, default=10, help="T, denoising steps unrolled per post-training iteration")
    p.add_argument("--routing-weight", type=float, default=0.001, help="lambda of the trajectory routing loss")
    p.add_argument("--routing-temp", type=float, default=1.0, help="temperature of the routing loss (our choice)")
    p.add_argument("--routing-mass", choices=("gate", "count"), default="gate",
                   help="A: the paper's selected gate mass, or our soft expert count (README: mass is not count)")
    p.add_argument("--routing-target", choices=("trajectory", "step"), default="trajectory",
                   help="one KL on A summed over the trajectory (paper), or the mean of one KL per step (ours)")
    p.add_argument("--saliency-target", choices=("raw", "residual"), default="raw",
                   help="M as is (paper), or minus the training data's mean saliency per token position (ours)")
    p.add_argument("--sal-hidden", type=int, default=64, help="hidden width of R_sal (our choice)")
    p.add_argument("--oracle", action="store_true", help="route with the true clean x0 instead of x0_hat (ablation)")
    p.add_argument("--post-path", choices=("unrolled", "stepwise"), default="stepwise",
                   help="post-training backward: all T graphs at once, or one step's at a time (the same gradient; README)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 500000, or 100000 with --init)")
    p.add_argument("--global-batch-size", type=int, default=256, help="images per step over all ranks")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=0.0, help="gradient-norm clipping (0: off, as in DiT; our CPU preset uses 1)")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay")
    p.add_argument("--logit-normal", action="store_true", help="logit-normal timesteps instead of uniform")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="runs/run", help="output folder (checkpoints, log.txt)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint (same command otherwise)")
    p.add_argument("--ckpt-every", type=int, default=5000, help="write OUT/last.pt every this many steps")
    p.add_argument("--log-every", type=int, default=100, help="log every this many steps")
    p.add_argument("--probe-images", type=int, default=PROBE_IMAGES, help="held-out images of the logged routing probe (0: no probe)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data-loader workers per rank (default: the cores per rank less one, 1 to 4)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 100_000 if args.init else 500_000
    return args


# ----------------------------------------------------------------------------------------------
# Main

# Flags a resumed run may change; every other flag must be the one the run started with.
RESUME_MAY_CHANGE = ("steps", "resume", "log_every", "ckpt_every", "num_workers", "out", "post_path", "probe_images")


def check_args(args):
    """Refuse nonsense before anything is built, in one line."""
    finite = math.isfinite
    for ok, msg in ((args.global_batch_size >= 1, f"--global-batch-size {args.global_batch_size} must be at least 1"),
                    (args.steps >= 1, f"--steps {args.steps} must be at least 1"),
                    (args.trajectory_steps >= 2, f"--trajectory-steps {args.trajectory_steps} must be at least 2: "
                     "step 1 has no x0_hat to route with (the paper uses 10)"),
                    (finite(args.lr) and args.lr > 0, f"--lr {args.lr:g} must be a positive number"),
                    (finite(args.routing_weight) and args.routing_weight >= 0,
                     f"--routing-weight {args.routing_weight:g} must be 0 or more (the paper: 0.001)"),
                    (0 <= args.ema < 1, f"--ema {args.ema:g} must be in [0, 1) (the paper: 0.9999)"),
                    (finite(args.weight_decay) and args.weight_decay >= 0, f"--weight-decay {args.weight_decay:g} must be 0 or more"),
                    (finite(args.grad_clip) and args.grad_clip >= 0, f"--grad-clip {args.grad_clip:g} must be 0 (off) or more"),
                    (finite(args.routing_temp) and args.routing_temp > 0, f"--routing-temp {args.routing_temp:g} must be positive"),
                    (min(args.log_every, args.ckpt_every) >= 1, "--log-every and --ckpt-every must be at least 1"),
                    (args.probe_images >= 0, f"--probe-images {args.probe_images} must be 0 or more"),
                    (args.num_workers is None or args.num_workers >= 0, f"--num-workers {args.num_workers} must be 0 or more")):
        if not ok:
            raise UserError(msg)


def check_resume(args, ckpt):
    """A resumed run continues exactly: the flags that shaped it must not change."""
    old = ckpt.get("args", {})
    now = vars(args)
    differ = [f"--{k.replace('_', '-')} {old[k]} (now {now[k]})" for k in now
              if k in old and k not in RESUME_MAY_CHANGE and old[k] != now[k]]
    if differ:
        raise UserError(f"--resume {args.resume} was run with other flags: {', '.join(differ)}; resume with the "
                        "same flags (only --steps, --log-every, --ckpt-every, --num-workers, --post-path, --probe-images may change), "
                        "or start a new --out")


def main(args):
    """Train; returns the (unwrapped) model and its EMA."""
    # 1. setup
    check_args(args)
    resume_path = args.resume
    if resume_path is None and os.path.exists(os.path.join(args.out, "last.pt")):
        raise UserError(f"{args.out} already holds a run; add --resume {args.out}/last.pt to "
                        "continue it, or pick another --out")
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt:
        check_resume(args, ckpt)
    rank, world, device = setup_distributed()
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                        f"world size {world}; use a multiple of {world}")
    local_batch = args.global_batch_size // world
    post = args.init is not None and args.sharpmoe == "on"

    # 2. data
    data, held_out = make_datasets(args)
    num_classes = len(data.classes)
    sampler = ResumableSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    workers = args.num_workers
    if workers is None:                                        # the cores of this rank, less the trainer's
        workers = max(1, min(4, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))
    loader = DataLoader(data, batch_size=local_batch, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0)
    steps_per_epoch = len(data) // args.global_batch_size
    if steps_per_epoch == 0:
        raise UserError(f"the data has {len(data)} images, fewer than --global-batch-size "
                        f"{args.global_batch_size}; lower the batch or add data")

    # 3. model, EMA, optimizer
    torch.manual_seed(args.seed)                               # the same init on every rank
    try:
        model, ema = build_models(args, data, device)
    except ValueError as e:                                    # a bad preset / router / size
        raise UserError(str(e))
    ema.requires_grad_(False).eval()
    cfg = model.cfg
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step, saliency_mean = 0, None                              # saliency_mean: the residual target's (N,)
    if resume_path:
        diff = sm.config_diff(checkpoint_config(ckpt, resume_path), cfg)
        if diff:
            raise UserError(f"--resume {resume_path} is a checkpoint of another config ({'; '.join(diff)}); "
                            "rerun the command that made it, or start a new --out")
        load_weights(model, ckpt["model"], resume_path)
        load_weights(ema, ckpt["ema"], resume_path)
        opt.load_state_dict(ckpt["opt"])
        step, saliency_mean = ckpt["step"], ckpt.get("saliency_mean")
    if post and args.saliency_target == "residual" and saliency_mean is None:   # once, stored with the run
        saliency_mean = position_saliency(data, cfg.patch_size)
    saliency_mean = saliency_mean.to(device) if saliency_mean is not None else None
    raw = model                                                # unwrapped: state_dict, EMA, probe
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    n_moe = len(raw.moe_layers())
    T = args.trajectory_steps if post else 1

    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "log.txt"), "a") if rank == 0 else None

    def log(msg):
        if rank == 0:
            tqdm.write(msg)
            log_file.write(msg + "\n")
            log_file.flush()

    n_params = sum(p.numel() for p in raw.parameters())
    log(f"{'post-training (SharpMoE)' if post else 'control continuation' if args.init else 'pretraining'}: "
        f"{cfg.router} router, {n_params / 1e6:.2f}M parameters, {len(data)} images, {num_classes} classes, "
        f"world {world}, device {device}, step {step} of {args.steps}"
        + (f"; RESUMED from {resume_path} (lines above for steps after {step} came from the killed run)" if resume_path else ""))

    # 4. training loop
    probe = RoutingProbe(held_out, device, args.probe_images) if n_moe and rank == 0 and args.probe_images else None
    if probe:
        log(f"step {step:7d}  {probe(raw)}  (before training)")
    sums, seen, t0 = {}, 0, time.time()                        # running sums of the logged statistics
    bad_step = torch.zeros((), dtype=torch.long, device=device)   # first step with a non-finite loss (0: none)
    data_iter = batches(loader, step, steps_per_epoch)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True) as pbar:
        while step < args.steps:
            try:
                x0, y = next(data_iter)
            except UserError as e:                             # a bad image: this rank's error alone
                e.rank_local = True
                raise
            flip, noise = step_noise(args, cfg, T, step, rank, world, device)
            x0, y = x0.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x0 = apply_flip(x0, flip)
            opt.zero_grad(set_to_none=True)
            routing_args = (args.routing_weight, args.routing_temp, args.routing_mass, args.routing_target,
                            saliency_mean, args.oracle)
            if post and args.post_path == "stepwise":              # backward inside, one step's graph at a time
                stats = sm.trajectory_backward_stepwise(model, cfg, x0, y, noise, *routing_args, forward_context=autocast,
                                                        no_sync=getattr(model, "no_sync", nullcontext))
                loss, aux = stats["fm"] + args.routing_weight * stats["routing"], stats["aux"]   # (logged, checked)
            else:
                with autocast():
                    if post:
                        loss, aux, stats = sm.trajectory_loss(model, cfg, x0, y, noise, *routing_args)
                    else:
                        loss, aux, routes = sm.flow_loss(model, cfg, x0, y, noise)
                        stats = dict(fm=loss.detach(), routing=torch.zeros((), device=device),
                                     counts=sm.expert_count(routes)[None] if n_moe else None)
                (loss + aux).backward()
            fm, routing, counts = stats["fm"], stats["routing"], stats["counts"]   # counts: (T, B, N)
            finite = torch.isfinite(loss.detach() + torch.as_tensor(aux).detach())
            bad_step = torch.where(finite | (bad_step > 0), bad_step, step + 1)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            update_ema(ema, raw, args.ema)
            step += 1
            seen += x0.shape[0]
            logged = dict(loss_fm=fm.float(), aux=torch.as_tensor(aux, device=device).float().detach(),
                          loss_routing=routing.float(), n=torch.ones((), device=device))
            if counts is not None:
                saliency = sm.laplacian_saliency(x0.float(), cfg.patch_size)
                logged["experts/token"] = counts.float().mean() / n_moe
                logged["corr"] = torch.stack([sm.rank_correlation(c, saliency).mean() for c in counts]).mean()
            sums = {k: sums.get(k, 0) + v for k, v in logged.items()}
            pbar.update(1)
            if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.steps:
                if world > 1:                                  # checked before anything is logged or saved
                    dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
                if bad_step and rank != 0:                     # rank 0 says it, once
                    sys.exit(1)
                if bad_step:
                    raise UserError(f"the loss became NaN or infinite at step {int(bad_step)}: training diverged. "
                                    f"Nothing after it was saved ({args.out}/last.pt, if any, is the last good one); "
                                    f"lower --lr ({args.lr:g}) or set --grad-clip 1, and --resume from there")
            if step % args.log_every == 0 or step == args.steps:
                totals = torch.stack(list(sums.values()))              # the same key order on every rank
                if world > 1:
                    dist.all_reduce(totals)
                mean = dict(zip(sums, (totals / totals[list(sums).index("n")]).tolist()))
                msg = f"step {step:7d}  loss_fm {mean['loss_fm']:.4f}  aux {mean['aux']:.4f}"
                if post:
                    msg += f"  loss_routing {mean['loss_routing']:.4f}"
                if n_moe:
                    msg += f"  experts/token {mean['experts/token']:.3f}  corr(count,saliency) batch {mean['corr']:+.3f}"
                if probe:
                    msg += f"  {probe(raw)}"
                log(msg + f"  img/s {seen * world / (time.time() - t0):.1f}")
                pbar.set_postfix(loss=f"{mean['loss_fm']:.4f}")
                sums, seen, t0 = {}, 0, time.time()
            if rank == 0 and (step % args.ckpt_every == 0 or step == args.steps):
                save_checkpoint(os.path.join(args.out, "last.pt"),
                                dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                     step=step, config=asdict(cfg),
                                     args=dict(vars(args), classes=list(data.classes), latent=getattr(data, "meta", None)),
                                     saliency_mean=saliency_mean))
    log(f"done: {args.out}/last.pt at step {step}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return raw, ema


def last_line(e):
    """A DataLoader worker re-raises our error with its traceback inside the message."""
    return re.sub(r"^[\w.]*UserError: ", "", str(e).strip().splitlines()[-1])


def run_cli(main, parse_args):
    """Run a script's main; bad input ends it with one line, under torchrun printed by rank 0
    (every rank meets the same bad flag), or by the one rank that met a bad image."""
    try:
        main(parse_args())
    except UserError as e:
        rank = int(os.environ.get("RANK", 0))
        if rank == 0 or getattr(e, "rank_local", False):
            print(f"error{f' (rank {rank})' if rank else ''}: {last_line(e)}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main, parse_args)
