"""
Sample quality, the paper's metric family: the Fréchet distance (FID's and ours, one copy) and,
at CPU scale, a small classifier of the training data in whose features the Fréchet distance is
taken (as MNIST-scale generators are measured), with its accuracy on the samples' labels.

The paper's FID needs the Inception weights (fid.py), which cannot be fetched everywhere and
mean little on 32x32 glyphs. classifier.py trains the classifier on the training split and
stores, beside its weights, its features of two disjoint sets of held-out images: `ref`, the
reference every sample set is compared with, and `floor`, as many other real images, whose
distance to `ref` at the same count is the noise floor of the measure.
"""
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError


# ----------------------------------------------------------------------------------------------
# The Fréchet distance

def statistics(feats, chunk=4096):
    """mu and sigma, in float64, of (N, D) features, accumulated in chunks (no float64 copy of
    all of them: 50,000 x 2048 features stay at 400 MB)."""
    n, d = feats.shape
    if n < d:
        warnings.warn(f"{n} samples for {d} feature dimensions: the covariance "
                      "is singular and the distance is biased upwards; use more samples")
    mu = feats.mean(0, dtype=np.float64)
    sigma = np.zeros((d, d))
    for start in range(0, n, chunk):
        x = feats[start:start + chunk].astype(np.float64) - mu
        sigma += x.T @ x
    return mu, sigma / (n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64. tr (S1 S2)^(1/2) =
    tr (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD matrix: two eigendecompositions, exact,
    no scipy.linalg.sqrtm (whose `disp` argument SciPy removed)."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise UserError(f"the two statistics have different dimensions ({mu1.shape[0]} and {mu2.shape[0]}); "
                        "both must come from the same network's features")
    w, V = np.linalg.eigh(s1)
    root1 = (V * np.sqrt(np.clip(w, 0, None))) @ V.T            # S1^(1/2)
    middle = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------
# The classifier (ours)

class Classifier(nn.Module):
    """A small CNN: uint8 images (B, H, W, 3) -> features (B, 128) (after global average
    pooling; the Fréchet distance's space) and logits (B, num_classes). Three stages of two 3x3
    convolutions with BatchNorm and ReLU, the last two halving the resolution."""

    def __init__(self, num_classes, width=32):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate((width, 2 * width, 4 * width)):
            for j in range(2):
                layers += [nn.Conv2d(c, w, 3, stride=2 if i and not j else 1, padding=1, bias=False),
                           nn.BatchNorm2d(w), nn.ReLU()]
                c = w
        self.body, self.head = nn.Sequential(*layers), nn.Linear(c, num_classes)

    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1        # (B, 3, H, W) in [-1, 1]
        feats = self.body(x).mean((2, 3))                      # (B, 128)
        return feats, self.head(feats)


def train_classifier(images, labels, num_classes, epochs=4, batch_size=128, lr=2e-3, seed=0, progress=None):
    """Train a Classifier on uint8 images (N, H, W, 3) and labels (N,), with horizontal flips
    (train.py flips its images too). AdamW, one-cycle cosine schedule. Returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = Classifier(num_classes)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    clf.train()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = images[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(2), x)  # (B, H, W, 3): W is dim 2
        loss = F.cross_entropy(clf(x)[1], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(step, steps, loss.item())
    return clf.eval()


@torch.no_grad()
def classify(clf, images, batch_size=500):
    """(features (N, 128) float32 numpy, predicted labels (N,) numpy) of uint8 images (N, H, W, 3)."""
    feats, preds = [], []
    for start in range(0, len(images), batch_size):
        f, logits = clf(torch.as_tensor(images[start:start + batch_size]))
        feats.append(f.numpy())
        preds.append(logits.argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def load_classifier(path):
    """(Classifier in eval mode, its checkpoint: classes, image_size, accuracy, and the held-out
    features `ref` and `floor`) from classifier.py's output, loaded with weights_only=True."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"classifier {path} does not exist; train one with python classifier.py --out DIR")
    except Exception as e:
        raise UserError(f"{path} is not a readable classifier.py checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or not {"model", "classes", "ref", "floor"} <= ckpt.keys():
        raise UserError(f"{path} is not a classifier.py checkpoint (no model, classes, ref and floor)")
    clf = Classifier(len(ckpt["classes"]))
    clf.load_state_dict(ckpt["model"])
    return clf.eval(), ckpt


def sample_quality(clf, ckpt, images, labels):
    """The quality of samples (uint8 (N, H, W, 3), the labels they were sampled with (N,) or None):
    `accuracy`, the share the classifier recognizes as their label (None without labels); `fd`, the Fréchet distance of
    their features to the held-out reference's; `floor`, the distance of as many other real
    held-out images to the same reference (the measure's noise floor at this N)."""
    size = ckpt["image_size"]
    if images.shape[1:] != (size, size, 3):
        raise UserError(f"the samples are {images.shape[1]}x{images.shape[2]}, the classifier was trained on "
                        f"{size}x{size} images")
    n, ref, floor = len(images), ckpt["ref"].numpy(), ckpt["floor"].numpy()
    if n > len(floor):
        raise UserError(f"{n} samples, more than the classifier's {len(floor)} floor images; use at most that many")
    feats, preds = classify(clf, images)
    ref_stats = statistics(ref)
    return dict(n=n, accuracy=None if labels is None else float((preds == np.asarray(labels)).mean()),
                fd=frechet_distance(*statistics(feats), *ref_stats),
                floor=frechet_distance(*statistics(floor[:n]), *ref_stats))


@torch.no_grad()
def model_quality(model, clf, ckpt, n=1000, steps=50, cfg_scale=1.5, seed=0, batch_size=250, progress=None):
    """sample_quality of n samples of a model (in eval mode): Euler with `steps` steps at
    `cfg_scale`, noise from common.noise_and_labels(range(n), seed) and labels i % classes (every
    class as often). Also `images`, the first 100 samples (uint8), for a look."""
    import sharpmoe as sm
    from common import noise_and_labels, to_uint8
    if len(ckpt["classes"]) != model.cfg.num_classes:
        raise UserError(f"the classifier knows {len(ckpt['classes'])} classes, the model {model.cfg.num_classes}")
    device = next(model.parameters()).device
    images, labels = [], torch.arange(n) % model.cfg.num_classes
    for start in range(0, n, batch_size):
        noise, _ = noise_and_labels(range(start, min(n, start + batch_size)), model.cfg, seed)
        x = sm.sample(model, noise.to(device), labels[start:start + batch_size].to(device), steps, cfg_scale)
        images.append(to_uint8(x))
        if progress:
            progress(len(noise))
    images = np.concatenate(images)
    return dict(sample_quality(clf, ckpt, images, labels.numpy()), images=images[:100])
