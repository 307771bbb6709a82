"""
FID and Inception Score with the standard network (TF's inception-2015-12-05, as ported by
pytorch-fid: pt_inception-2015-12-05-6726825d.pth), in pure torch; or, with --classifier, the
CPU-scale measure: the Fréchet distance in the features of a small classifier of the training
data (classifier.py) and its accuracy on the samples' labels, with the measure's noise floor.

    python fid.py runs/ec/samples/samples.npz REF.npz            # FID against REF, IS of the samples
    python fid.py IMAGE_FOLDER --save-stats ref_stats.npz         # write mu / sigma for later
    python fid.py runs/ec/samples/samples.npz --classifier runs/classifier/classifier.pt

Inputs: an .npz with arr_0 (N, H, W, 3) uint8 (read in batches; arr_1, the labels, if any), or a
folder of images. A reference .npz that carries mu and sigma (pytorch-fid's --save-stats, ADM's
reference batches) is used as stored; otherwise its arr_0 images are measured.

Preprocessing is the ADM evaluator's graph: TF1 bilinear resize to 299 (align_corners=False,
no half-pixel offset), then (x - 128) / 128. Features: pool3 (2048) for FID, the 1008 logits
for IS (pool3 @ W without the fc bias; 10 splits at i * N // 10). BatchNorm in eval mode, TF32
off. The FID variants of the blocks follow pytorch-fid: average pools that exclude padding
(Mixed_5*, Mixed_6b-e, Mixed_7b) and a max pool in the last block's pool branch (Mixed_7c).

Argument order: SAMPLES first, then REF (the ADM evaluator takes REF first); a reference batch
given first is recognized and refused with the right call.
"""
import argparse
import hashlib
import os
import re
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import HelpFormatter, UserError, check_writable, run_cli, save_npz
from data import IMAGE_EXTENSIONS, read_rgb
from quality import frechet_distance, load_classifier, sample_quality, statistics

WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"


# ----------------------------------------------------------------------------------------------
# The network (state_dict keys as in the published file; BatchNorm without num_batches_tracked)

class BatchNorm(nn.Module):
    """Eval-only BatchNorm (eps 1e-3, as TF's): weight, bias, running_mean, running_var."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-3)


class Conv(nn.Module):
    """BasicConv2d: conv (no bias), BatchNorm, ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = BatchNorm(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):                                                # FID: padding not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = Conv(cin, c7, 1), Conv(c7, c7, **row), Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **row), Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)), self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(b),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """`max_pool`: the FID network's last block (Mixed_7c) max-pools in its pool branch."""

    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, (1, 3), padding=(0, 1)), Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, (1, 3), padding=(0, 1)), Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a, d = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


def tf_resize_matrix(n_in, n_out):
    """(n_out, n_in) weights of TF1's bilinear resize (align_corners=False, no half-pixel
    centers): output i samples the input at i * n_in / n_out."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    w[torch.arange(n_out), i0] += 1 - (src - i0)
    w[torch.arange(n_out), i1] += src - i0
    return w


class FIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = Conv(64, 80, 1), Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    @staticmethod
    def preprocess(images):
        """(B, H, W, 3) uint8 -> (B, 3, 299, 299): TF1 bilinear resize, then (x - 128) / 128."""
        x = images.permute(0, 3, 1, 2).double()
        rh, rw = tf_resize_matrix(x.shape[2], 299).to(x.device), tf_resize_matrix(x.shape[3], 299).to(x.device)
        x = torch.einsum("oh,bchw,pw->bcop", rh, x, rw)         # (B, 3, 299, 299)
        return ((x - 128) / 128).float()

    def forward(self, images):
        """uint8 images (B, H, W, 3) -> pool3 features (B, 2048), and the logits for the
        Inception Score (B, 1008): pool3 @ W without the fc bias, as the ADM evaluator,
        improved-GAN and torch-fidelity take them."""
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        pool3 = x.mean((2, 3))                                  # (B, 2048)
        return pool3, pool3 @ self.fc.weight.t()


def load_inception(path=None, device="cpu"):
    """The FID network with the published weights: PATH, or downloaded when online. The file's
    sha256 must start with the hex prefix in its name (torch.hub's convention)."""
    if path is None:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL))
        if not os.path.exists(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(WEIGHTS_URL, path, hash_prefix=WEIGHTS_URL.split("-")[-1][:-4])
            except Exception as e:
                raise UserError(f"cannot download the Inception weights ({type(e).__name__}); download "
                                f"{WEIGHTS_URL} elsewhere and pass --inception-weights PATH")
    if not os.path.isfile(path):
        raise UserError(f"Inception weights {path} do not exist")
    prefix = re.search(r"-([0-9a-f]{6,})\.pth?$", os.path.basename(path))
    if prefix is None:
        raise UserError(f"{path}: the file name must end in -<sha256 prefix>.pth, as the published "
                        f"{os.path.basename(WEIGHTS_URL)} does")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if not digest.startswith(prefix.group(1)):
        raise UserError(f"{path} is corrupt or not the published file: sha256 {digest[:8]}..., "
                        f"the name says {prefix.group(1)}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    net = FIDInception()
    missing, unexpected = sorted(net.state_dict().keys() - state.keys()), sorted(state.keys() - net.state_dict().keys())
    if missing or unexpected:
        raise UserError(f"{path} is not the FID Inception network (missing weights: {', '.join(missing[:3]) or 'none'}; "
                        f"extra: {', '.join(unexpected[:3]) or 'none'})")
    net.load_state_dict(state)                                  # strict: every key must match
    return net.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Inputs, statistics, the metrics

def npy_header(f):
    """(shape, fortran_order, dtype) of an open .npy stream, left at the start of its data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def npz_batches(path, batch_size):
    """Batches of arr_0 from an .npz, read from the zip member without loading it all."""
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        shape = npy_header(f)[0]
        row = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            yield np.frombuffer(bytearray(f.read(n * row)), np.uint8).reshape(n, *shape[1:])   # writable


def image_files(folder):
    """The images of a folder; names starting with a dot (.DS_Store, macOS's ._IMG.png) are not images."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def folder_batches(folder, batch_size):
    files = image_files(folder)
    for start in range(0, len(files), batch_size):
        yield np.stack([np.asarray(read_rgb(path)) for path in files[start:start + batch_size]])


def npz_path(path):
    """np.savez adds .npz to a name without it: the file a name stands for."""
    return path if path.endswith(".npz") or os.path.exists(path) or not os.path.exists(path + ".npz") else path + ".npz"


def check_input(path, role):
    """Before any work: the number of images in an input, or None for a reference .npz that
    carries statistics (mu, sigma). One clear line for anything else."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist")
    if os.path.isdir(path):                                     # every image decoded once, before any work
        nested = [d for d in sorted(os.listdir(path)) if not d.startswith(".") and os.path.isdir(os.path.join(path, d))
                  and image_files(os.path.join(path, d))]
        if nested:                                              # pytorch-fid reads the top level only
            has = "also holds subfolders of images" if image_files(path) else "holds its images in subfolders"
            raise UserError(f"{path} {has} ({', '.join(nested[:3])}{' ...' if len(nested) > 3 else ''}), "
                            "which fid.py would ignore: it reads the images at the top of a folder, as pytorch-fid "
                            "does; pass one flat folder of images (or an .npz)")
        sizes = {}
        for f in tqdm(image_files(path), desc=f"checking {os.path.basename(path)}", leave=False):
            sizes.setdefault(read_rgb(f).size, f)
        if len(sizes) > 1:
            (a, fa), (b, fb) = list(sizes.items())[:2]
            raise UserError(f"images in {path} differ in size ({a[0]}x{a[1]} {fa}, {b[0]}x{b[1]} {fb}); "
                            "resize them to one size first")
        return len(image_files(path))
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is neither an image folder nor an .npz file (or a truncated one)")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if {"mu.npy", "sigma.npy"} <= names:
                if role == "reference":
                    with np.load(path) as f:
                        if not (np.isfinite(f["mu"]).all() and np.isfinite(f["sigma"]).all()):
                            raise UserError(f"{path}: its mu / sigma are not all numbers (NaN or inf); recompute it")
                    return None
                raise UserError(f"{path} holds statistics (mu, sigma): it is a reference, and fid.py takes the "
                                f"samples first: python fid.py SAMPLES {path} (the ADM evaluator takes REF SAMPLES)")
            if "arr_0.npy" not in names:
                raise UserError(f"{path} has no arr_0; expected images (N, H, W, 3) uint8")
            with z.open("arr_0.npy") as f:
                shape, fortran, dtype = npy_header(f)
                start = f.tell()
            size = z.getinfo("arr_0.npy").file_size
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable .npz ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                        "rewrite it") from None
    if fortran or dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise UserError(f"{path}: arr_0 is {dtype} {shape}; expected (N, H, W, 3) uint8")
    if size != start + int(np.prod(shape)):
        raise UserError(f"{path}: arr_0 holds {size - start} bytes, its header says {shape} ({int(np.prod(shape))}); "
                        "the file is truncated or damaged: rewrite it")
    return shape[0]


@torch.no_grad()
def features(net, path, batch_size, device):
    """pool3 features (N, 2048) and IS logits (N, 1008), float32, of an .npz or an image folder."""
    n = check_input(path, "samples")
    if n < 2:
        raise UserError(f"{path} has {n} image(s); FID needs at least 2 (50,000 for comparable numbers)")
    batches = folder_batches(path, batch_size) if os.path.isdir(path) else npz_batches(path, batch_size)
    pools, logits = [], []
    for b in tqdm(batches, total=-(-n // batch_size), desc=f"inception {os.path.basename(path)}"):
        p, l = net(torch.from_numpy(b).to(device))
        pools.append(p.float().cpu())
        logits.append(l.float().cpu())
    pools, logits = torch.cat(pools).numpy(), torch.cat(logits).numpy()
    if not np.isfinite(pools).all():                            # (damaged weights, a GPU fault): no "FID nan"
        raise UserError(f"the Inception features of {path} are not all numbers (NaN or inf); check the weights file")
    return pools, logits


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` splits of the N images at
    i * N // splits, as improved-GAN and torch-fidelity split them."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), 1)
    N, splits = logp.shape[0], min(splits, logp.shape[0])
    scores = []
    for i in range(splits):
        part = logp[i * N // splits:(i + 1) * N // splits]
        p_y = torch.logsumexp(part, 0) - np.log(part.shape[0])  # log of the marginal
        scores.append(float(torch.exp((part.exp() * (part - p_y)).sum(1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def reference_stats(net, path, batch_size, device):
    """Stored mu / sigma when the file has them (never recomputed), else from its images."""
    if check_input(path, "reference") is None:
        with np.load(path) as f:
            return f["mu"], f["sigma"]
    return statistics(features(net, path, batch_size, device)[0])


def npz_labels(path):
    """arr_1 of an .npz (the labels sample.py writes), or None."""
    if os.path.isdir(path):
        return None
    with np.load(path) as f:
        return f["arr_1"] if "arr_1" in f.files else None


def classifier_quality(args):
    """--classifier: the Fréchet distance of the samples to the classifier's held-out reference
    in its features, the noise floor at the same count, and the accuracy on arr_1's labels."""
    if args.ref or args.save_stats:
        raise UserError("--classifier measures against the held-out reference stored with the classifier; "
                        "drop REF and --save-stats")
    clf, ckpt = load_classifier(args.classifier)
    batches = folder_batches(args.samples, 1000) if os.path.isdir(args.samples) else npz_batches(args.samples, 1000)
    images, labels = np.concatenate(list(batches)), npz_labels(args.samples)
    if labels is not None and (labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= len(ckpt["classes"])):
        raise UserError(f"{args.samples}: arr_1 is not one label in 0..{len(ckpt['classes']) - 1} per image")
    q = sample_quality(clf, ckpt, images, labels)
    acc = "no labels (arr_1)" if q["accuracy"] is None else f"accuracy {q['accuracy']:.3f}"
    print(f"{args.samples}: {q['n']} images; classifier Fréchet distance {q['fd']:.3f} (noise floor "
          f"{q['floor']:.3f}: as many real held-out images), {acc} (real held-out images: {ckpt['accuracy']:.3f})")
    return q


def main(args):
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1")
    args.samples, args.ref = npz_path(args.samples), args.ref and npz_path(args.ref)
    if args.save_stats:
        args.save_stats += "" if args.save_stats.endswith(".npz") else ".npz"   # what np.savez writes
        if os.path.isdir(args.save_stats) or not os.path.isdir(os.path.dirname(os.path.abspath(args.save_stats))):
            raise UserError(f"--save-stats {args.save_stats}: not a file in an existing folder")
        check_writable(os.path.dirname(os.path.abspath(args.save_stats)), "--save-stats")
    check_input(args.samples, "samples")                        # both inputs, before any work
    if args.classifier:
        return classifier_quality(args)
    if args.ref:
        check_input(args.ref, "reference")
    torch.backends.cuda.matmul.allow_tf32 = False               # reference numbers: full fp32
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = load_inception(args.inception_weights, device)
    pool, logits = features(net, args.samples, args.batch_size, device)
    mu, sigma = statistics(pool)
    is_mean, is_std = inception_score(logits)
    print(f"{args.samples}: {pool.shape[0]} images, Inception Score {is_mean:.3f} +- {is_std:.3f}")
    if args.save_stats:
        save_npz(args.save_stats, mu=mu, sigma=sigma)           # atomic: never a truncated file
        print(f"wrote {args.save_stats} (mu, sigma)")
    if args.ref:
        fid = frechet_distance(mu, sigma, *reference_stats(net, args.ref, args.batch_size, device))
        print(f"FID {fid:.4f}  ({args.samples} against {args.ref})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("samples", help=".npz with arr_0 (N, H, W, 3) uint8, or an image folder")
    p.add_argument("ref", nargs="?", default=None, help="reference: .npz with mu/sigma or arr_0, or an image folder")
    p.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (default: download)")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception forward")
    p.add_argument("--save-stats", default=None, help="write mu / sigma of SAMPLES to this .npz (.npz is added "
                   "to a name without it)")
    p.add_argument("--classifier", default=None, help="classifier.py's checkpoint: measure in its features "
                   "against its held-out reference, instead of Inception's (CPU-scale data)")
    run_cli(main, p.parse_args)
