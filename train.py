"""
Pretrain a DiT-MoE, or post-train one with SharpMoE, on the CPU, one GPU, or under torchrun.

    python train.py --recipe cpu --router ec --out runs/ec               # pretraining on a CPU
    python train.py --recipe cpu --init runs/ec/last.pt --out runs/ec-sharpmoe   # SharpMoE
    python train.py --recipe cpu --init runs/ec/last.pt --sharpmoe off --out runs/ec-control
    torchrun --nproc_per_node=8 train.py --router diffmoe --data /imagenet/train --out runs/diffmoe

--recipe paper (the default) is the paper's recipe: DiT-L, AdamW lr 1e-4, batch 256, EMA 0.9999,
T = 10, lambda = 0.001, 500K pretraining / 100K post-training steps. --recipe cpu is ours for a
laptop (common.RECIPES). A flag given on the command line overrides the recipe. A killed run
continues with the same command plus --resume OUT/last.pt.
"""
import argparse
import hashlib
import itertools
import math
import os
import sys
import time
from contextlib import nullcontext
from copy import deepcopy

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import sharpmoe as sm
from common import (RECIPES, HelpFormatter, UserError, check_out_folder, check_writable,
                    checkpoint_config, generator, hold_lock, load_checkpoint, load_weights, run_cli,
                    save_checkpoint, setup_distributed)
from data import (BUILTIN, PROBE_IMAGES, data_flags, data_shape, make_datasets, position_saliency,
                  probe_batch, spread_batch)

# The model's flags: for pretraining; a model from --init keeps its own.
MODEL_DEFAULTS = dict(preset=None, router="ec", num_experts=0, top_k=1, moe_every=2,
                      class_dropout=0.1, threshold_decay=0.95, patch_size=0, predict="v")
# The post-training flags: with --init only (trajectory_steps: the recipe's).
SHARPMOE_DEFAULTS = dict(sharpmoe="on", trajectory_steps=None, routing_weight=0.001,
                         routing_temp=1.0, routing_mass="gate", routing_scope="trajectory",
                         saliency_target="raw", sal_hidden=64, sal_position="on", oracle=False,
                         backward="stepwise")
# Flags a resumed run may change; every other flag must be the one the run started with.
RESUME_MAY_CHANGE = ("steps", "resume", "log_every", "ckpt_every", "probe_every", "num_workers",
                     "out", "backward", "probe_images",
                     "lr", "grad_clip")   # (lr, grad_clip: to recover from a divergence)
RENAMED = {"routing_target": "routing_scope", "post_path": "backward"}  # flags of older checkpoints
PATHS = ("data", "val_data", "init")  # stored absolute: a checkpoint's args resolve from any folder


# ----------------------------------------------------------------------------------------------
# Setup helpers

def check_args(args):
    """Refuse nonsense before anything is built, in one line."""
    finite = math.isfinite
    check_out_folder(args.out, "--out")
    for flag, folder in (("--data", args.data), ("--val-data", args.val_data)):
        if folder and os.path.commonpath([os.path.abspath(args.out), folder]) == folder:
            raise UserError(f"--out {args.out} lies inside {flag} {folder}: it would be read as a "
                            "class folder; put the run elsewhere")
    if args.resume is None and os.path.exists(os.path.join(args.out, "last.pt")):
        raise UserError(f"{args.out} already holds a run; add --resume {args.out}/last.pt to "
                        "continue it, or pick another --out")
    checks = [(args.global_batch_size >= 1,
               f"--global-batch-size {args.global_batch_size} must be at least 1"),
              (args.steps >= 1, f"--steps {args.steps} must be at least 1"),
              (finite(args.lr) and args.lr > 0, f"--lr {args.lr:g} must be a positive number"),
              (args.warmup >= 0, f"--warmup {args.warmup} must be 0 (none) or more"),
              (0 <= args.ema < 1, f"--ema {args.ema:g} must be in [0, 1) (the paper: 0.9999)"),
              (finite(args.weight_decay) and args.weight_decay >= 0,
               f"--weight-decay {args.weight_decay:g} must be 0 or more"),
              (finite(args.grad_clip) and args.grad_clip >= 0,
               f"--grad-clip {args.grad_clip:g} must be 0 (off) or more"),
              (min(args.log_every, args.ckpt_every, args.probe_every) >= 1,
               "--log-every, --ckpt-every and --probe-every must be at least 1"),
              (args.probe_images >= 0, f"--probe-images {args.probe_images} must be 0 or more"),
              (args.num_workers is None or args.num_workers >= 0,
               f"--num-workers {args.num_workers} must be 0 or more")]
    if args.init:   # (the post-training flags exist only there)
        checks += [(args.trajectory_steps >= 2,
                    f"--trajectory-steps {args.trajectory_steps} must be at least 2: "
                    "step 1 has no x0_hat to route with (the paper uses 10)"),
                   (finite(args.routing_weight) and args.routing_weight >= 0,
                    f"--routing-weight {args.routing_weight:g} must be 0 or more "
                    "(the paper: 0.001)"),
                   (finite(args.routing_temp) and args.routing_temp > 0,
                    f"--routing-temp {args.routing_temp:g} must be positive")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def resume_checkpoint(args):
    """The checkpoint of --resume (None without it), after checking that the flags that shaped
    the run did not change: a resumed run continues exactly."""
    if args.resume is None:
        return None
    ckpt = load_checkpoint(args.resume)
    old = {RENAMED.get(k, k): os.path.abspath(v) if k in PATHS and v else v
           for k, v in ckpt.get("args", {}).items()}
    ignored = RESUME_MAY_CHANGE + tuple(MODEL_DEFAULTS if args.init else SHARPMOE_DEFAULTS)
    # a flag of the other kind of run
    unset = lambda k, v: k not in PATHS and (v is None or old[k] is None)
    differ = [f"--{k.replace('_', '-')} {old[k]} (now {v})" for k, v in vars(args).items()
              if k in old and k not in ignored and not unset(k, v) and old[k] != v]
    if differ:
        may = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE
                        if k not in ("resume", "out"))
        raise UserError(f"--resume {args.resume} was run with other flags: {', '.join(differ)}; "
                        f"resume with the same flags (only {may} may change), or start a new --out")
    return ckpt


def make_loader(data, args, rank, world, device):
    """A DataLoader over this rank's share of each epoch, and the steps per epoch."""
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                        f"world size {world}; use a multiple of {world}")
    steps_per_epoch = len(data) // args.global_batch_size
    if steps_per_epoch == 0:
        raise UserError(f"the data has {len(data)} images, fewer than --global-batch-size "
                        f"{args.global_batch_size}; lower the batch or add data")
    sampler = ResumableSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                               drop_last=True)
    workers = args.num_workers
    if workers is None:   # the cores of this rank, less the trainer's
        workers = max(1, min(4, (os.cpu_count() or 1)
                                // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))
    loader = DataLoader(data, batch_size=args.global_batch_size // world, sampler=sampler,
                        num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=workers > 0)
    return loader, steps_per_epoch


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (for an exact --resume)."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def batches(loader, step, steps_per_epoch):
    """Endless batches, starting at global step `step` of a deterministic epoch order. A bad
    image is this rank's error alone (run_cli lets this rank print it)."""
    epoch, skip = divmod(step, steps_per_epoch)
    while True:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = skip * loader.batch_size
        try:
            yield from loader
        except UserError as e:
            e.rank_local = True
            raise
        epoch, skip = epoch + 1, 0


def build_models(args, data, device, ckpt=None):
    """(model, ema). Pretraining: a fresh model from --preset and the model flags. With --init
    (its checkpoint, ckpt): its weights and EMA, plus zero-initialized R_sal when --sharpmoe on."""
    (channels, size), num_classes = data_shape(data, args.image_size), len(data.classes)
    if args.init is None:
        try:
            patch = dict(patch_size=args.patch_size) if args.patch_size else {}   # 0: the preset's
            cfg = sm.make_config(args.preset, router=args.router, num_experts=args.num_experts,
                                 top_k=args.top_k, moe_every=args.moe_every,
                                 class_dropout=args.class_dropout,
                                 threshold_decay=args.threshold_decay, image_size=size,
                                 in_channels=channels, num_classes=num_classes,
                                 predict=args.predict, **patch)
        except ValueError as e:                                # a bad preset / router / size
            raise UserError(str(e))
        model = sm.DiT(cfg)
        return model.to(device), deepcopy(model).to(device)
    cfg = checkpoint_config(ckpt, args.init)
    if cfg.sharpmoe and args.sharpmoe == "off":
        raise UserError(f"--init {args.init} is already a SharpMoE model; the control "
                        "(--sharpmoe off) starts from the pretrained base checkpoint")
    if (cfg.in_channels, cfg.image_size, cfg.num_classes) != (channels, size, num_classes):
        raise UserError(f"--init {args.init} is for "
                        f"{cfg.in_channels}x{cfg.image_size}x{cfg.image_size} inputs and "
                        f"{cfg.num_classes} classes, the data has {channels}x{size}x{size} and "
                        f"{num_classes}; pass the matching --image-size and --data")
    if cfg.sharpmoe:   # its R_sal is trained: its config wins
        differ = [f"--{k.replace('_', '-')} {v}" for k, v, had in (
            ("sal_hidden", args.sal_hidden, cfg.sal_hidden),
            ("sal_position", args.sal_position, "on" if cfg.sal_position else "off"))
            if v is not None and v != had]
        if differ:
            raise UserError(f"--init {args.init} already has R_sal "
                            f"(sal_hidden {cfg.sal_hidden}, sal_position "
                            f"{'on' if cfg.sal_position else 'off'}); drop {', '.join(differ)}")
    else:
        cfg.sal_hidden = (SHARPMOE_DEFAULTS["sal_hidden"] if args.sal_hidden is None
                          else args.sal_hidden)
        cfg.sal_position = (args.sal_position or SHARPMOE_DEFAULTS["sal_position"]) == "on"
    model = sm.DiT(cfg)
    load_weights(model, ckpt["model"], args.init)
    if args.sharpmoe == "on" and not cfg.sharpmoe:
        try:
            sm.add_saliency_routers(model)
        except ValueError as e:                                # a dense model
            raise UserError(f"--init {args.init}: {e}; "
                            "pass --sharpmoe off to continue it as a control")
    ema = deepcopy(model)                                      # R_sal starts equal in both
    if "ema" not in ckpt:                                      # (weights stripped for sharing)
        print(f"note: --init {args.init} has no EMA weights; the EMA starts from its model weights")
        return model.to(device), ema.to(device)
    incompatible = ema.load_state_dict(ckpt["ema"], strict=False)
    assert not incompatible.unexpected_keys and all("sal_router" in k
                                                    for k in incompatible.missing_keys)
    return model.to(device), ema.to(device)


def run_record(args, data, held_out, world):
    """What a checkpoint records of its run (common.save_checkpoint's `args`)."""
    return dict(vars(args), classes=list(data.classes), latent=getattr(data, "meta", None),
                held_out=held_out_id(held_out), world=world)


def held_out_id(held_out):
    """A short id of which items the held-out set holds (images added to a folder move it)."""
    if hasattr(held_out, "files"):                             # an image folder: its files
        key = [held_out.files[i][0] for i in held_out.index]
    elif hasattr(held_out, "index"):                           # a latent folder: its items
        key = [int(i) for i in held_out.index]
    else:                                                      # built-in data: its index range
        key = [held_out.start, len(held_out)]
    return hashlib.sha1(repr(key).encode()).hexdigest()[:12]


def check_same_data(path, flag, stored, data, held_out, world, router):
    """A run continued (--resume) or post-trained (--init) on data whose classes changed would
    silently swap its labels: refused. Returns notes for the log: a moved held-out split; for
    DiffMoE resumed on another number of ranks, that the run is another one."""
    old, new = list(stored.get("classes") or []), list(data.classes)
    if old and old != new:
        changed = ([f"{a!r} is now {b!r}" for a, b in zip(old, new) if a != b][:3]
                   or [f"{len(old)} classes, now {len(new)}"])
        raise UserError(f"{flag} {path} was trained on other classes ({'; '.join(changed)}): "
                        "its labels would be swapped; restore the class folders' names, "
                        "or train a new run")
    notes = []
    if stored.get("held_out") not in (None, held_out_id(held_out)):
        notes.append(f"note: the held-out images differ from those of {path} (images were added "
                     "or removed): probe lines before and after this point measure other images")
    if flag == "--resume" and router == "diffmoe" and stored.get("world", world) != world:
        notes.append(f"note: {path} ran on {stored['world']} rank(s), this run on {world}: "
                     "DiffMoE's pool is each rank's batch, so the continued run differs from the "
                     "uninterrupted one")
    return notes


def restore(ckpt, path, model, ema, opt):
    """Weights, EMA and optimizer of a resumed run; returns (step, saliency_mean)."""
    if ckpt is None:
        return 0, None
    missing = [k for k in ("ema", "opt", "step") if k not in ckpt]
    if missing:
        raise UserError(f"--resume {path} has no {', '.join(missing)} (weights shared for "
                        "sampling, or another version's file): it cannot continue a run; "
                        "post-train from it with --init instead")
    diff = sm.config_diff(checkpoint_config(ckpt, path), model.cfg)
    if diff:
        raise UserError(f"--resume {path} is a checkpoint of another config ({'; '.join(diff)}); "
                        "rerun the command that made it, or start a new --out")
    load_weights(model, ckpt["model"], path)
    load_weights(ema, ckpt["ema"], path)
    opt.load_state_dict(ckpt["opt"])
    return ckpt["step"], ckpt.get("saliency_mean")


def sharpmoe_loss(args, data, cfg, saliency_mean, device):
    """The SharpMoE loss options of this run (None: ordinary training, as pretraining and the
    controls). The residual target's per-position baseline is computed once, then stored."""
    if args.init is None or args.sharpmoe == "off":
        return None
    if args.saliency_target == "residual" and saliency_mean is None:
        saliency_mean = position_saliency(data, cfg.patch_size)
    return sm.SharpMoEOptions(lam=args.routing_weight, temp=args.routing_temp,
                              mass=args.routing_mass, scope=args.routing_scope, oracle=args.oracle,
                              stepwise=args.backward == "stepwise",
                              saliency_mean=(None if saliency_mean is None
                                             else saliency_mean.to(device)))


def step_draws(args, cfg, T, step, rank, world, device):
    """The flips and the sm.Draw of one step. Every rank draws them for the whole global batch
    from the same seed and keeps its own rows (rank r holds the batch's rows r, r + world, ...,
    as DistributedSampler deals the images), so a run does not depend on the number of ranks and
    a resumed run draws what the uninterrupted one drew."""
    g = generator(args.seed, step, device)
    G, rows = args.global_batch_size, slice(rank, None, world)
    draw = sm.draw_training(cfg, G, T, g, device, args.t_sampling)
    flip = torch.rand(G, generator=g, device=device) < 0.5
    return flip[rows], draw.rows(rows)


def learning_rate(args, step):
    """The lr of a step: a linear warmup over --warmup steps, then constant (the paper's) or, with
    --lr-schedule cosine, a cosine decay to 0 at --steps (ours, for short CPU runs)."""
    warm = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
    if args.lr_schedule == "constant":
        return args.lr * warm
    progress = min(1.0, max(0, step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))


def apply_flip(x0, flip):
    """Random horizontal flips: pixels (B, C, H, W) are mirrored; latent pairs (B, 2, C, s, s)
    give their mirror image's latents (a flipped latent is not the latent of the flipped image)."""
    if x0.dim() == 5:
        return torch.where(flip.view(-1, 1, 1, 1), x0[:, 1], x0[:, 0])
    return torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)


@torch.no_grad()
def update_ema(ema, model, decay):
    """The weights' EMA. DiffMoE's thresholds (buffers) are not averaged: the EMA gets its own
    from its own capacity predictor before each save (EMAThresholds)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


class EMAThresholds:
    """DiffMoE: fits the EMA model's thresholds to its own capacity predictor (sm.fit_thresholds)
    on fixed training images and noise, drawn as this run's iterations are (T steps after --init
    with SharpMoE, one t per image otherwise). The raw model's thresholds do not fit the EMA's
    predictor. A no-op for the other routers."""

    def __init__(self, data, cfg, T, opts, args, device, n=256):
        self.active = cfg.router == "diffmoe"
        if self.active:
            self.x0, self.y = spread_batch(data, n, device)
            g = generator(args.seed, -1, device)
            self.draw = sm.draw_training(cfg, len(self.y), T, g, device, args.t_sampling)
            self.oracle = bool(opts and opts.oracle)

    def __call__(self, ema):
        if self.active:
            sm.fit_thresholds(ema, self.x0, self.y, self.draw, self.oracle)


# ----------------------------------------------------------------------------------------------
# Logging helpers

class Meter:
    """Running sums of the logged statistics since the last log line, all-reduced when read, and
    the first step whose loss was not finite."""

    def __init__(self, device):
        self.device, self.sums, self.images, self.t0 = device, {}, 0, time.time()
        self.bad_step = torch.zeros((), dtype=torch.long, device=device)   # 0: none

    def add(self, step, stats, x0, patch_size):
        loss = stats["fm"] + stats["aux"]   # the routing loss: non-finite only if these are
        finite = torch.isfinite(loss + stats["routing"])
        self.bad_step = torch.where(finite | (self.bad_step > 0), self.bad_step, step)
        row = dict(loss_fm=stats["fm"].float(), aux=stats["aux"].float(),
                   loss_routing=stats["routing"].float(), n=torch.ones((), device=self.device))
        if stats["counts"] is not None:                        # (T, B, N): the mean over steps
            row["corr"] = sm.count_saliency(stats["counts"],
                                            sm.laplacian_saliency(x0, patch_size))["corr"].mean()
        self.sums = {k: self.sums.get(k, 0) + v for k, v in row.items()}
        self.images += x0.shape[0]

    def stop_if_diverged(self, world, rank, args):
        """One place that ends a diverged run, before anything is logged or saved."""
        if world > 1:
            dist.all_reduce(self.bad_step, op=dist.ReduceOp.MAX)
        if self.bad_step and rank != 0:                        # rank 0 says it, once
            sys.exit(1)
        if self.bad_step:
            last = os.path.join(args.out, "last.pt")
            rerun = (f"rerun with --resume {last} and" if os.path.exists(last)
                     else "nothing was saved; rerun with")
            raise UserError(f"the loss became NaN or infinite at step {int(self.bad_step)}: "
                            f"training diverged; {rerun} a lower --lr (now {args.lr:g}) or "
                            "--grad-clip 1 (nothing after the last good step is saved)")

    def read(self, world):
        """The means over all ranks since the last read, and images/s; then starts over."""
        totals = torch.stack(list(self.sums.values()))         # the same key order on every rank
        if world > 1:
            dist.all_reduce(totals)
        mean = dict(zip(self.sums, (totals / totals[list(self.sums).index("n")]).tolist()))
        mean["img/s"] = self.images * world / (time.time() - self.t0)
        self.sums, self.images, self.t0 = {}, 0, time.time()
        return mean


class RoutingProbe:
    """sm.routing_probe on fixed held-out images and noise, so that every run (pretraining,
    SharpMoE, controls) logs the same per-step measurements; routed as the run trains (the true
    x0 for an --oracle run; autocast, the training precision). Rank 0 only, while the others
    wait: 10 forwards per probe image, every --probe-every steps."""

    def __init__(self, held_out, device, n, oracle, autocast):
        self.x0, self.y, self.eps = probe_batch(held_out, n, device=device)
        self.oracle, self.autocast = oracle, autocast

    def __call__(self, model):
        with self.autocast():
            r = sm.routing_probe(model, self.x0, self.y, self.eps, oracle=self.oracle)
        row = lambda v, f: "/".join(format(v[sm.PROBE_T.index(t)], f) for t in sm.SHOW_T)
        return (f"probe t={row(sm.PROBE_T, '.3g')}: corr {row(r['corr'].tolist(), '+.2f')} "
                f"pos {row(r['corr_pos'].tolist(), '+.2f')} loss {row(r['loss'].tolist(), '.3f')}")


def header(args, model, opts, data, world, device, step, ckpt):
    what = ("SharpMoE post-training" if opts else "control continuation" if args.init
            else "pretraining")
    resumed = ""
    if ckpt:   # a run killed before its own --steps left lines
        killed = ckpt.get("args", {}).get("steps", step) > step
        resumed = f"; RESUMED from {args.resume}" + (f" (log lines above for steps after {step} "
                                                     "came from the interrupted run)"
                                                     if killed else "")
    return (f"{what}: {model.cfg.router} router, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"{len(data)} images, {len(data.classes)} classes, world {world}, device {device}, "
            f"step {step} of {args.steps}" + resumed)


def log_line(step, mean, opts, cfg, n_moe):
    """The means since the last line. (Training fixes the mean number of experts per token, by
    TC's k or EC's and DiffMoE's capacity, so only the counts' agreement with saliency is
    logged; aux is TC's balance loss or DiffMoE's capacity-predictor BCE.)"""
    msg = f"step {step:7d}  loss_fm {mean['loss_fm']:.4f}"
    if cfg.router in ("tc", "diffmoe"):
        msg += f"  aux {mean['aux']:.4f}"
    if opts:
        msg += f"  loss_routing {mean['loss_routing']:.4f}"
    if n_moe:
        msg += f"  corr(count,saliency) batch {mean['corr']:+.3f}"
    return msg + f"  img/s {mean['img/s']:.1f}"


def open_log(out, rank):
    """log(msg): rank 0 prints it above the progress bar and appends it to OUT/log.txt."""
    if rank != 0:
        return lambda msg: None
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, "log.txt"), "a")
    return lambda msg: (tqdm.write(msg), f.write(msg + "\n"), f.flush())


# ----------------------------------------------------------------------------------------------
# Main

def main(args):
    """Train; returns the (unwrapped) model and its EMA. One run per --out at a time (a lock)."""
    check_args(args)
    check_writable(args.out, "--out")
    with hold_lock(args.out) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        return train(args)


def train(args):
    # 1. setup
    ckpt = resume_checkpoint(args)
    init = load_checkpoint(args.init) if args.init else None
    rank, world, device = setup_distributed()
    # (GPUs: TF32, as DiT)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # 2. data, the same as the run's it continues
    data, held_out = make_datasets(**data_flags(vars(args)))
    notes = [n for path, flag, c in ((args.resume, "--resume", ckpt), (args.init, "--init", init))
             if c for n in check_same_data(path, flag, c.get("args", {}), data, held_out, world,
                                           c["config"]["router"])]
    loader, steps_per_epoch = make_loader(data, args, rank, world, device)

    # 3. model, EMA, optimizer, the SharpMoE loss (None: ordinary training)
    torch.manual_seed(args.seed)                               # the same init on every rank
    model, ema = build_models(args, data, device, init)
    ema.requires_grad_(False).eval()
    cfg, n_moe = model.cfg, len(model.moe_layers())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=True if device.type == "cuda" else None)   # (GPUs: fused AdamW)
    step, saliency_mean = restore(ckpt, args.resume, model, ema, opt)
    if step >= args.steps:   # a finished run: nothing to add to it
        if rank == 0:
            print(f"{args.resume} is at step {step} of --steps {args.steps}; nothing to train")
        if world > 1:
            dist.destroy_process_group()
        return model, ema
    opts = sharpmoe_loss(args, data, cfg, saliency_mean, device)
    T = args.trajectory_steps if opts else 1
    raw = model                                                # unwrapped: state_dict, EMA, probe
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    log, record = open_log(args.out, rank), run_record(args, data, held_out, world)
    for line in [header(args, raw, opts, data, world=world, device=device, step=step, ckpt=ckpt),
                 *notes]:
        log(line)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    probe = None
    if n_moe and args.probe_images and rank == 0:
        probe = RoutingProbe(held_out, device, args.probe_images, bool(opts and opts.oracle),
                             autocast)
        log(f"step {step:7d}  {probe(raw)}  (before training)")
    fit_ema = EMAThresholds(data, cfg, T, opts, args, device)   # (every rank: the same EMA)

    # 4. the loop: draw, forward/backward, step, EMA, log, save
    meter, data_iter = Meter(device), batches(loader, step, steps_per_epoch)
    no_sync = getattr(model, "no_sync", nullcontext)
    with tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True) as pbar:
        while step < args.steps:
            x0, y = next(data_iter)
            flip, draw = step_draws(args, cfg, T, step, rank, world, device)
            x0, y = (apply_flip(x0.to(device, non_blocking=True), flip),
                     y.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            stats = sm.forward_backward(model, cfg, x0, y, draw, opts, autocast=autocast,
                                        no_sync=no_sync)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, step)
            opt.step()
            update_ema(ema, raw, args.ema)
            step += 1
            meter.add(step, stats, x0, cfg.patch_size)
            pbar.update(1)
            logs, saves, probes = (step % n == 0 or step == args.steps
                                   for n in (args.log_every, args.ckpt_every, args.probe_every))
            if logs or saves:
                meter.stop_if_diverged(world, rank, args)
            if logs:
                mean = meter.read(world)
                log(log_line(step, mean, opts, cfg, n_moe))
                pbar.set_postfix(loss=f"{mean['loss_fm']:.4f}")
            if probes and probe:
                log(f"step {step:7d}  {probe(raw)}")
            if saves:
                fit_ema(ema)
            if saves and rank == 0:
                save_checkpoint(os.path.join(args.out, "last.pt"), raw, ema, opt, step, record,
                                saliency_mean=None if opts is None else opts.saliency_mean)
    log(f"done: {args.out}/last.pt at step {step}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return raw, ema


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    recipe = lambda k: "; ".join(f"{name}: {r[k]}" for name, r in RECIPES.items())
    add = p.add_argument
    add("--recipe", choices=tuple(RECIPES), default="paper",
        help="the defaults of the flags marked 'recipe'")
    # data
    add("--data", default=None, help="ImageNet-style folder DIR/CLASS/IMAGE, or a latent folder "
        "made by latents.py (default: the built-in data, --builtin)")
    add("--image-size", type=int, default=None, help="training resolution in pixels (a latent "
        f"folder sets its own; recipe: {recipe('image_size')})")
    add("--builtin", choices=tuple(BUILTIN), default=None,
        help=f"built-in data when --data is not given (recipe: {recipe('builtin')})")
    add("--builtin-size", type=int, default=10_000, help="number of built-in training images")
    add("--val-data", default=None, help="held-out folder for the routing probe (default: "
        f"{PROBE_IMAGES} images split off --data; built-in data has its own held-out range)")
    add("--allow-empty-classes", action="store_true", help="keep class folders without images as "
        "classes (refused otherwise: sampling would draw labels that have no data)")
    # the model (pretraining only: a model from --init keeps its own)
    add("--preset", default=None,
        help=f"model size, one of {', '.join(sm.PRESETS)} (recipe: {recipe('preset')})")
    add("--router", default=None, help=f"one of {', '.join(sm.ROUTERS)} (default: ec)")
    add("--patch-size", type=int, default=None,
        help="pixels (or latents) per token side (default: the preset's)")
    add("--predict", choices=("v", "x"), default=None, help="the network's output: v (default: the "
        "paper's) or the clean image x, turned into v (ours; sharpmoe.DiT.velocity)")
    add("--num-experts", type=int, default=None,
        help="experts per MoE layer (default 0: 16 for diffmoe, 8 for tc and ec)")
    add("--top-k", type=int, default=None,
        help="experts per token on average (default: 1, the paper's)")
    add("--moe-every", type=int, default=None,
        help="an MoE layer in every n-th block (default: 2, the paper's)")
    add("--class-dropout", type=float, default=None, help="label dropout for CFG (default: 0.1)")
    add("--threshold-decay", type=float, default=None, help="DiffMoE threshold EMA (default: 0.95)")
    # SharpMoE post-training
    add("--init", default=None, help="post-train from this pretrained checkpoint (weights and EMA)")
    add("--sharpmoe", choices=("on", "off"), default=None,
        help="with --init: on (default) adds R_sal and trains on trajectories; off is the control "
             "(plain continuation)")
    add("--trajectory-steps", type=int, default=None,
        help=f"T, steps unrolled per SharpMoE iteration (recipe: {recipe('trajectory_steps')})")
    add("--routing-weight", type=float, default=None,
        help="lambda of the routing loss (default: 0.001, the paper's)")
    add("--routing-temp", type=float, default=None,
        help="temperature of the routing loss (default: 1, our choice)")
    add("--routing-mass", choices=("gate", "count"), default=None,
        help="A: the paper's selected gate mass (default), or our soft expert count "
             "(sm.routed_mass)")
    add("--routing-scope", choices=("trajectory", "step"), default=None,
        help="one KL on A summed over the trajectory (default: the paper), or the mean of one KL "
             "per step (ours)")
    add("--saliency-target", choices=("raw", "residual"), default=None,
        help="M as is (default: the paper), or minus the training data's mean saliency per token "
             "position (ours)")
    add("--sal-hidden", type=int, default=None,
        help="hidden width of R_sal (default: 64, our choice; a SharpMoE --init keeps its own)")
    add("--sal-position", choices=("on", "off"), default=None,
        help="R_sal reads x0_hat's patch embedding plus the position embedding (default: on, our "
             "choice), or without it")
    add("--oracle", action="store_true", default=None,
        help="route with the true clean x0 instead of x0_hat (an ablation bound)")
    add("--backward", choices=("unrolled", "stepwise"), default=None,
        help="SharpMoE's backward: all T steps' graphs at once (faster), or one step's at a time "
             "(default; 1/T of the memory); the same gradient")
    # optimization
    add("--steps", type=int, default=None,
        help=f"training steps (recipe, pretraining / --init: {recipe('steps')})")
    add("--global-batch-size", type=int, default=None,
        help=f"images per step over all ranks (recipe: {recipe('global_batch_size')})")
    add("--lr", type=float, default=None, help=f"AdamW learning rate (recipe: {recipe('lr')})")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    add("--t-sampling", choices=("uniform", "logit-normal"), default=None,
        help=f"t of one-step training (pretraining, the controls; recipe: "
        f"{recipe('t_sampling')})")
    add("--lr-schedule", choices=("constant", "cosine"), default=None,
        help="after the warmup: constant, or a cosine decay to 0 at --steps (recipe, pretraining "
        f"/ --init: {recipe('lr_schedule')})")
    add("--warmup", type=int, default=None,
        help=f"steps of linear lr warmup, 0: none (recipe, pretraining / --init: "
        f"{recipe('warmup')})")
    add("--grad-clip", type=float, default=None,
        help=f"gradient-norm clipping, 0: off (recipe: {recipe('grad_clip')})")
    add("--ema", type=float, default=None,
        help=f"EMA decay (recipe, pretraining / --init: {recipe('ema')})")
    add("--seed", type=int, default=0, help="random seed")
    # output
    add("--out", default="runs/run", help="output folder (checkpoints, log.txt)")
    add("--resume", default=None, help="continue from this checkpoint (same command otherwise)")
    add("--ckpt-every", type=int, default=None,
        help=f"write OUT/last.pt every this many steps (recipe: {recipe('ckpt_every')})")
    add("--log-every", type=int, default=None,
        help=f"log every this many steps (recipe: {recipe('log_every')})")
    add("--probe-images", type=int, default=PROBE_IMAGES,
        help="held-out images of the logged routing probe (0: no probe)")
    add("--probe-every", type=int, default=None,
        help="run the routing probe every this many steps, on rank 0 while "
             f"the others wait (10 forwards per image; recipe: {recipe('probe_every')})")
    add("--num-workers", type=int, default=None,
        help="data-loader workers per rank (default: the cores per rank less one, 1 to 4)")
    return complete_args(p.parse_args(argv))


def complete_args(args):
    """Refuse model flags given with --init (the model comes from the checkpoint); fill what the
    command line left open from the model defaults and the recipe; make paths absolute."""
    for k in PATHS:
        if getattr(args, k):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    flag = lambda k: "--" + k.replace("_", "-")
    given = lambda defaults: [k for k in defaults if getattr(args, k) is not None]
    if args.init and given(MODEL_DEFAULTS):
        raise UserError(f"--init {args.init} brings its own model; drop "
                        f"{', '.join(map(flag, given(MODEL_DEFAULTS)))} (they would be ignored)")
    if not args.init and given(SHARPMOE_DEFAULTS):
        raise UserError(f"{', '.join(map(flag, given(SHARPMOE_DEFAULTS)))}: post-training flags, "
                        "for a run from --init CKPT (pretraining would ignore them)")
    for k, v in (SHARPMOE_DEFAULTS if args.init else MODEL_DEFAULTS).items():
        # (R_sal: build_models)
        if getattr(args, k) is None and k not in ("sal_hidden", "sal_position"):
            setattr(args, k, v)
    for k, v in RECIPES[args.recipe].items():
        if (getattr(args, k) is None and not (k == "preset" and args.init)
                and not (k == "trajectory_steps" and not args.init)):
            setattr(args, k, v[1 if args.init else 0] if isinstance(v, tuple) else v)
    return args


if __name__ == "__main__":
    run_cli(main, parse_args)
