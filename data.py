"""
The data: built-in images drawn from their index (nothing to download), ImageNet-style image
folders, latent folders written by latents.py (and the VAE that makes and decodes them), the
held-out split, the routing probe's fixed batch, and the training data's mean saliency per token
position. Every script reads data through this file.
"""
import json
import os
from copy import copy

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import sharpmoe as sm
from common import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff", ".gif")
HELD_OUT = 10 ** 9      # built-in images from this index on are never trained on (probe, reports)
PROBE_IMAGES = 256      # held-out images of the routing probe that train.py logs


# ----------------------------------------------------------------------------------------------
# Built-in data

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


class Strokes(Builtin):
    """Closer to real images: a thin-stroke glyph (the class) placed anywhere near the centre at
    any angle, and a small textured patch anywhere, on a smooth, low-contrast background (a
    colour, a gentle gradient, a broad blob). Most tokens are smooth; the salient ones are few,
    thin and not where a positional prior would put them."""
    key = 1
    classes = ("line", "two-lines", "cross", "ring", "arc", "zigzag", "triangle", "tee", "spiral", "wave")
    ink = 1.5                   # the stroke's half width in pixels at 32x32 (antialiased edge)
    scale = (0.25, 0.5)         # the glyph's size, a fraction of the image's half width
    contrast = (0.4, 0.8)       # |ink - background|
    noise_texture = 0.5         # the chance that the patch is random noise, not a checkerboard
    tilt = np.pi                # the glyph turns by an angle drawn from [-tilt, tilt]
    smooth = 1.0                # the background's gradient and blob, 0: a flat colour

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
        img = bg + self.smooth * ((g[0] * X + g[1] * Y)[..., None] + blob[..., None] * rng.uniform(-0.15, 0.15, 3))
        tilt = rng.uniform(0, 2 * np.pi) if self.tilt == np.pi else rng.uniform(-self.tilt, self.tilt)
        a = tilt                                                   # the glyph: turned, scaled, placed
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        seg = self.glyph(y) @ rot.T * rng.uniform(*self.scale) + rng.uniform(-0.35, 0.35, 2)
        P, p0, d = np.stack([X, Y], -1)[None], seg[:, None, None, 0], (seg[:, 1] - seg[:, 0])[:, None, None]
        s = np.clip(((P - p0) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0, 1)   # (S, H, W)
        dist = np.linalg.norm(P - p0 - s[..., None] * d, axis=-1).min(0) * 16   # in pixels at 32x32
        ink = np.clip(self.ink - dist, 0, 1)[..., None]            # 2 * ink px wide, antialiased
        color = bg + rng.choice([-1, 1]) * rng.uniform(*self.contrast) + rng.uniform(-0.2, 0.2, 3)
        img = img * (1 - ink) + color * ink
        w = rng.integers(4, 8) * self.size // 32                   # a small textured patch
        px, py = rng.integers(0, self.size - w, 2)
        noisy = rng.random() >= 1 - self.noise_texture
        tex = rng.random((w, w)) if noisy else np.add.outer(np.arange(w), np.arange(w)) % 2
        img[py:py + w, px:px + w] += (tex[..., None] - 0.5) * rng.uniform(0.3, 0.6)
        return np.clip(img, -1, 1)


class Glyphs(Strokes):
    """Strokes made easier to generate (the CPU recipe's data): bolder (about 4 px at 32x32),
    larger and higher-contrast glyphs, nearly upright (turned by at most 17 degrees), on a flat
    background colour; the textured patch always a checkerboard (no unpredictable noise). The
    saliency stays uneven and off-centre: the glyph's outline and the patch, placed anywhere
    near the centre."""
    key = 2
    ink, scale, contrast, noise_texture, tilt, smooth = 2.0, (0.4, 0.65), (0.6, 0.9), 0.0, 0.3, 0.0


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


BUILTIN = {"strokes": Strokes, "glyphs": Glyphs, "shapes": Shapes}


# ----------------------------------------------------------------------------------------------
# Image folders

def center_crop(img, size):
    """ADM / DiT preprocessing: halve with BOX while the short side is >= 2x the target, resize
    the short side to `size` with BICUBIC, then crop the center."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


class Folder(Dataset):
    """What image and latent folders share: the items they serve (self.index) and the held-out split."""

    def split_off(self, n):
        """Hold out n items (every k-th, so all classes): removed from this set, returned as
        another."""
        held, k = copy(self), max(len(self.index) // n, 2)
        held.index = self.index[::k][:n]
        self.index = np.array([j for i, j in enumerate(self.index) if i % k or i // k >= n], dtype=np.int64)
        return held

    def __len__(self):
        return len(self.index)


def visible(names):
    """Names that are data: anything starting with a dot (.ipynb_checkpoints, .DS_Store, macOS's
    ._IMG.jpg copies, .git) is not, at any level."""
    return sorted(n for n in names if not n.startswith("."))


def read_rgb(path):
    """An image file as an 8-bit RGB PIL image, fully decoded, whatever its mode: 16-bit
    grayscale (I;16*) and 32-bit integer (I, holding 16-bit values) are scaled from 0..65535, float
    (F) from [0, 1] (Pillow's convert("RGB") would clip them all to white). Anything that cannot be
    read is a UserError naming the file. fid.py holds the same rules (a test keeps them equal)."""
    try:
        img = Image.open(path)
        img.load()                                              # a truncated file fails here, not later
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            a, top = np.asarray(img, dtype=np.float64), 1.0 if img.mode == "F" else 65535.0
            if not np.isfinite(a).all():
                raise ValueError(f"mode {img.mode} with values that are not numbers (NaN or inf)")
            if a.min() < 0 or a.max() > top:
                raise ValueError(f"mode {img.mode} with values outside [0, {top:g}]")
            img = Image.fromarray(np.round(a * (255 / top)).astype(np.uint8))
        return img.convert("RGB")
    except Exception as e:
        says = str(e).splitlines()[0][:80] if str(e) and str(path) not in str(e) else ""
        raise UserError(f"cannot read image {path} ({type(e).__name__}{': ' + says if says else ''}); fix or remove it")


class ImageFolder(Folder):
    """An ImageNet-style folder: DIR/CLASS/IMAGE, classes in sorted order (names starting with a
    dot are skipped). Items: (x, label), x (3, size, size) in [-1, 1], center-cropped. A class
    folder without images is refused unless allow_empty (its label would exist, with no data)."""

    def __init__(self, root, size, allow_empty=False):
        if not os.path.isdir(root):
            raise UserError(f"data folder {root} does not exist; pass --data DIR with one "
                            "subfolder per class, or leave --data out for the built-in data")
        self.classes = [d for d in visible(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
        per_class = [[os.path.join(root, c, f) for f in visible(os.listdir(os.path.join(root, c)))
                      if f.lower().endswith(IMAGE_EXTENSIONS)] for c in self.classes]
        self.files = [(f, y) for y, files in enumerate(per_class) for f in files]
        if not self.files:
            raise UserError(f"data folder {root} has no images in class subfolders; expected "
                            f"{root}/CLASS/IMAGE.jpg")
        empty = [c for c, files in zip(self.classes, per_class) if not files]
        if empty and not allow_empty:
            raise UserError(f"data folder {root} has class folders without images: {', '.join(empty[:5])}"
                            f"{' ...' if len(empty) > 5 else ''}; remove them, or pass --allow-empty-classes "
                            "to keep them as classes")
        self.size, self.index = size, np.arange(len(self.files))

    def __getitem__(self, i):
        path, y = self.files[self.index[i]]
        arr = np.asarray(center_crop(read_rgb(path), self.size), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(arr).permute(2, 0, 1), y


# ----------------------------------------------------------------------------------------------
# Latent folders (latent mode) and the VAE

class LatentFolder(Folder):
    """A latent folder written by latents.py. Items: (latents, label) with latents (2, C, s, s)
    float32, the image's and its mirror's (pairs=True, for training), or the image's (C, s, s)."""

    def __init__(self, root, pairs=True, allow_empty=False):
        meta_path = os.path.join(root, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"latent folder {root} has no meta.json: its extraction did not finish; "
                            f"rerun latents.py into it to complete it")
        with open(meta_path) as f:
            self.meta = m = json.load(f)
        try:
            self.latents = np.load(os.path.join(root, "latents.npy"), mmap_mode="r")
            self.labels = np.load(os.path.join(root, "labels.npy"), mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"latent folder {root}: cannot read latents.npy / labels.npy ({type(e).__name__}); "
                            "rerun latents.py into a new folder")
        shape = (m["count"], 2, m["channels"], m["latent_size"], m["latent_size"])
        if self.latents.shape != shape or self.labels.shape != (m["count"],):
            raise UserError(f"latent folder {root}: the arrays disagree with meta.json (latents {self.latents.shape}, "
                            f"labels {self.labels.shape}; meta says {shape}); rerun latents.py into a new folder")
        if self.labels.dtype.kind not in "iu" or m["count"] and not 0 <= self.labels.min() <= self.labels.max() < len(m["classes"]):
            raise UserError(f"latent folder {root}: labels.npy holds {self.labels.dtype} labels "
                            + (f"from {self.labels.min()} to {self.labels.max()}" if m["count"] else "")
                            + f", not integers in 0..{len(m['classes']) - 1} (its {len(m['classes'])} classes); "
                            "rerun latents.py into a new folder")
        self.root = root
        empty = [c for c, n in zip(m["classes"], np.bincount(self.labels, minlength=len(m["classes"]))) if n == 0]
        if empty and not allow_empty:
            raise UserError(f"latent folder {root} has classes without latents: {', '.join(empty[:5])}; "
                            "pass --allow-empty-classes to keep them as classes")
        self.classes, self.pairs, self.index = m["classes"], pairs, np.arange(m["count"])

    def __getitem__(self, i):
        j = self.index[i]
        x = torch.from_numpy(self.latents[j].astype(np.float32))   # (2, C, s, s)
        if not torch.isfinite(x).all():
            raise UserError(f"latent folder {self.root}: latent {j} is not a number (NaN or inf); rerun latents.py "
                            "into a new folder (it refuses such latents now)")
        return (x if self.pairs else x[0]), int(self.labels[j])

    def split_off(self, n):
        held = super().split_off(n)
        held.pairs = False                                      # held-out latents: the image's only
        return held


def is_latent_folder(path):
    return path is not None and any(os.path.exists(os.path.join(path, f)) for f in ("meta.json", "latents.npy"))


VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(name, device="cpu"):
    """diffusers' AutoencoderKL from a local folder or a Hugging Face id (cache first)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("latent mode needs diffusers: pip install diffusers (or pip install -r requirements-test.txt)")
    name = VAES.get(name, name)
    try:
        load = lambda **kw: AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=False, **kw)   # (no accelerate)
        if os.path.isdir(name):
            vae = load()
        else:
            try:
                vae = load(local_files_only=True)
            except Exception:                                   # not cached: try the network
                vae = load()
    except Exception as e:
        raise UserError(f"cannot load the VAE {name!r} ({type(e).__name__}): it is not a local folder, not in the "
                        f"Hugging Face cache, and could not be downloaded; download it where there is a network "
                        f"(huggingface-cli download {name}) and pass --vae /path/to/it")
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images):
    """(B, 3, H, W) in [-1, 1] -> latents (B, 4, H / f, W / f): the posterior mean times the VAE's
    scaling factor (deterministic, as DiT's feature extraction)."""
    return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def decode(vae, latents):
    """Latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1] (not clamped)."""
    return vae.decode(latents / vae.config.scaling_factor).sample


# ----------------------------------------------------------------------------------------------
# Training and held-out sets, the probe batch, the per-position saliency

def open_folder(path, image_size, pairs=True, allow_empty=False):
    """A latent folder (latents.py; pairs: each latent with its mirror's) or an image folder, by
    what the path holds."""
    if is_latent_folder(path):
        return LatentFolder(path, pairs, allow_empty)
    return ImageFolder(path, image_size, allow_empty)


# The flags (train.py's, stored in every checkpoint's args) that say what a run's data is.
DATA_FLAGS = ("data", "val_data", "builtin", "builtin_size", "image_size", "allow_empty_classes")


def data_flags(args):
    """The DATA_FLAGS of a dict of flags (train.py's args, or a checkpoint's), for make_datasets."""
    return {k: args[k] for k in DATA_FLAGS if k in args}


def make_datasets(data=None, val_data=None, builtin="strokes", builtin_size=10_000, image_size=32,
                  allow_empty_classes=False):
    """(training set, held-out set). `data` an image folder or a latent folder (latents.py); the
    held-out set is `val_data`, or a tenth of `data` (at most PROBE_IMAGES items) split off.
    Without `data`, the built-in set `builtin` and 1024 of its held-out images. Takes train.py's
    flags by name (data_flags picks them from train.py's args or a checkpoint's)."""
    if not data:
        make = BUILTIN[builtin]
        return make(image_size, builtin_size), make(image_size, 1024, start=HELD_OUT)
    train_set = open_folder(data, image_size, allow_empty=allow_empty_classes)
    if val_data:                                                # (a small held-out set may lack a class)
        held_out = open_folder(val_data, image_size, pairs=False, allow_empty=True)
    else:
        held_out = train_set.split_off(max(1, min(PROBE_IMAGES, len(train_set) // 10)))
    if held_out.classes != train_set.classes:
        raise UserError(f"--val-data {val_data} has other classes than --data {data}; "
                        "give it the same class subfolders")
    return train_set, held_out


def data_shape(data, image_size):
    """(channels, size) of what the model denoises: RGB pixels at image_size, or a latent
    folder's latents (its meta.json decides)."""
    if isinstance(data, LatentFolder):
        return data.meta["channels"], data.meta["latent_size"]
    return 3, image_size


def probe_batch(held_out, n, seed=0, device="cpu"):
    """The routing probe's fixed inputs: the first n held-out items (x0, y) and noise eps drawn
    from `seed`, the same for every checkpoint."""
    items = [held_out[i] for i in range(min(n, len(held_out)))]
    x0 = torch.stack([x for x, _ in items])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return x0.to(device), torch.tensor([y for _, y in items], device=device), eps.to(device)


def spread_batch(data, n, device="cpu"):
    """n items (x0, y) at evenly spread indices of a set (all classes of a class-sorted folder);
    a latent pair gives the image's latents."""
    idx = np.linspace(0, len(data) - 1, min(n, len(data))).round().astype(int)
    items = [data[int(i)] for i in idx]
    x0 = torch.stack([x[0] if x.dim() == 4 else x for x, _ in items])
    return x0.to(device), torch.tensor([y for _, y in items], device=device)


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
