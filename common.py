"""
The plumbing the scripts share: one-line errors and the CLI runner, distributed setup, the
training recipes, seeds, the checkpoint format (all of it in save_checkpoint), and uint8 / .npz
helpers. Nothing about
the method is here (that is sharpmoe.py) and nothing about data (data.py).
"""
import argparse
import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import threading
import zipfile
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist

import sharpmoe as sm


class UserError(Exception):
    """Bad input: printed as one line, without a traceback, by run_cli. `rank_local`: only the
    rank that met it knows (a bad image), so that rank prints it."""

    def __init__(self, message, rank_local=False):
        super().__init__(message)
        self.rank_local = rank_local


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's lines and shows each flag's default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in action.help:                   # (not `in`: 0 == False would hide a 0)
            return action.help
        return action.help + " (default: %(default)s)"


def last_line(e):
    """A DataLoader worker re-raises our error with its traceback inside the message."""
    return re.sub(r"^[\w.]*UserError: ", "", str(e).strip().splitlines()[-1])


PEER_GONE = re.compile(r"by peer|Connection closed|Connection reset|Broken pipe")   # gloo, when a rank has ended


def run_cli(main, parse_args):
    """Run a script's main; bad input ends it with one line. Under torchrun every rank meets a
    bad flag, so rank 0 prints it; a bad image only one rank meets, so that rank prints it, and
    the ranks left waiting for it exit quietly instead of adding their tracebacks."""
    rank = int(os.environ.get("RANK", 0))
    try:
        main(parse_args())
    except UserError as e:
        if rank == 0 or e.rank_local:
            print(f"error{f' (rank {rank})' if rank else ''}: {last_line(e)}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(1)
    except OSError as e:                                       # a write outside atomic(): one line too
        if e.errno not in WRITE_ERRORS:
            raise
        print(f"error: {write_error(e.filename or '?', e)}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and PEER_GONE.search(str(e)):
            sys.exit(1)                                         # another rank failed, and said why
        raise


def check_out_folder(path, flag):
    """Before any work: refuse an output folder that is, or lies under, an existing file."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        where = "" if p == os.path.abspath(path) else f": {p}"
        raise UserError(f"{flag} {path}{where} is a file, not a folder; pass a folder")


# ----------------------------------------------------------------------------------------------
# Writing: atomically, into folders checked before any work, one line when the disk says no

WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the disk is read-only", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def write_error(path, e):
    """The UserError for a failed write of path: what the disk said, and how much is free."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    said = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(e).splitlines()[0])[:100]   # (torch's prefix)
    why = WRITE_ERRORS.get(getattr(e, "errno", None)) or f"{type(e).__name__}: {said}"
    free = shutil.disk_usage(folder).free / 2**30
    return UserError(f"cannot write {path}: {why} ({free:.1f} GiB free on the disk of {folder}); free space or "
                     "pick another output folder, then rerun (what was written before is intact)")


@contextlib.contextmanager
def atomic(path):
    """Yields a temporary name beside path (unique to this process); when the block ends it
    replaces path, so a crash, a full disk or a second writer never leaves a truncated file
    that reads as whole. A failed write becomes write_error's one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:                       # (torch.save: RuntimeError on a full disk)
        if isinstance(e, OSError) and e.errno not in WRITE_ERRORS or isinstance(e, RuntimeError) and "writ" not in str(e):
            raise
        raise write_error(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path, obj, **kw):
    write_text(path, json.dumps(obj, **kw))


def cached(path, key, compute):
    """compute()'s result (JSON values), cached in the file path under key: recomputed when the
    file is missing or was written under another key (other settings)."""
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        value = next((saved[k] for k in ("value", "quality", "views") if k in saved), None)   # (older names)
        if saved.get("key") == key and value is not None:
            return value
    value = compute()
    write_json(path, dict(key=key, value=value))
    return value


def save_image(image, path):
    """A PIL image as a PNG, atomically."""
    with atomic(path) as tmp:
        image.save(tmp, format="PNG")


def check_writable(folder, flag):
    """Before any work: write and remove a file in the output folder (or in its nearest
    existing parent, creating nothing), so that a read-only or full disk is said at once, not
    after the work."""
    check_out_folder(folder, flag)
    where = os.path.abspath(folder)
    while not os.path.isdir(where):
        where = os.path.dirname(where)
    test = os.path.join(where, f".write-test{os.getpid()}")
    try:
        with open(test, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(os.path.join(folder, "FILE"), e) from None
    finally:
        if os.path.exists(test):
            os.remove(test)


@contextlib.contextmanager
def hold_lock(folder):
    """An exclusive lock on FOLDER/.lock while the block runs (the kernel releases it when the
    process ends, however it ends): a second run into the same folder gets one line."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"another run is writing into {folder} (process {f.read().strip() or '?'} holds "
                            f"{folder}/.lock); wait for it to end, or pick another output folder") from None
        f.seek(0), f.truncate(), f.write(str(os.getpid())), f.flush()
        yield


DIST_TIMEOUT = datetime.timedelta(hours=2)


def setup_distributed():
    """(rank, world, device). torchrun sets RANK; without it this is one process on a GPU or
    the CPU. nccl on GPUs, gloo on CPUs."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    missing = [k for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"RANK is set but not {', '.join(missing)}: start the script under torchrun "
                        "(torchrun --nproc_per_node=N SCRIPT ...), or unset RANK for one process")
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)                            # before the process group binds one
    # The other ranks wait in a collective while rank 0 writes a checkpoint (DiT-L with AdamW and
    # EMA: about 20-30 GB) or runs the routing probe: NCCL's default 10 minutes would kill a run
    # on storage slower than about 50 MB/s.
    world, where = os.environ["WORLD_SIZE"], f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    waiting = threading.Timer(30, lambda: print(f"rank {os.environ['RANK']}: still waiting for all {world} ranks "
                                                f"at {where}; are they all started?", file=sys.stderr, flush=True))
    waiting.start()                                             # (a rank that never comes would hang silently)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT)
    finally:
        waiting.cancel()
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


# Training recipes (train.py --recipe, which compare.py passes on). A pair is (pretraining,
# post-training from --init); a flag given on the command line wins. "paper": the paper's recipe.
# "cpu", ours, chosen by sweep.py (results/sweep.md): a 2.6M-parameter model on 16x16 glyphs (64
# tokens) whose samples the classifier recognizes at 86% after 12000 steps (about 35 minutes on 2
# idle cores; 9000 steps: 73%); lr 1e-3 with warmup and logit-normal t because the paper's lr 1e-4
# and uniform t learned more slowly at this size in our prototype runs (sweep.py's uniform-t setting
# measures the latter); EMA 0.98 after --init because a 0.999 average would barely move in 150 steps.
RECIPES = {
    "paper": dict(preset="L", global_batch_size=256, lr=1e-4, grad_clip=0.0, ema=0.9999, trajectory_steps=10,
                  steps=(500_000, 100_000), log_every=100, ckpt_every=5000, probe_every=5000, warmup=0,
                  t_sampling="uniform", builtin="glyphs", image_size=32, lr_schedule="constant"),
    "cpu": dict(preset="cpu", global_batch_size=32, lr=(1e-3, 3e-4), grad_clip=1.0, ema=(0.999, 0.98), trajectory_steps=4,
                steps=(12000, 150), log_every=(500, 50), ckpt_every=500, probe_every=(1000, 50),
                warmup=(500, 0), t_sampling="logit-normal", builtin="glyphs", image_size=16,
                lr_schedule="constant"),
}


# ----------------------------------------------------------------------------------------------
# Seeds

SEED_STRIDE = 1_000_003    # a prime: seed * SEED_STRIDE + i never collides for i < SEED_STRIDE


def generator(seed, i, device="cpu"):
    """The generator of item i (a training step, a sample) of a run with this seed: the same
    draws whatever the batch, the number of ranks, or where a run was resumed."""
    return torch.Generator(device).manual_seed(seed * SEED_STRIDE + i)


def noise_and_labels(indices, cfg, seed):
    """Sampling inputs: sample i gets its noise (C, H, W) and label from generator(seed, i),
    whatever the batch or rank. Returns noise (B, C, H, W) and labels (B,)."""
    noise, labels = [], []
    for i in indices:
        g = generator(seed, i)
        noise.append(torch.randn(cfg.in_channels, cfg.image_size, cfg.image_size, generator=g))
        labels.append(int(torch.randint(cfg.num_classes, (1,), generator=g)))
    return torch.stack(noise), torch.tensor(labels)


# ----------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, model, ema, opt, step, record, saliency_mean=None):
    """The whole checkpoint format, written atomically (a crash mid-write leaves the previous
    file intact). Only tensors and plain values, so it loads with weights_only=True:
      model, ema, opt   state dicts (the unwrapped model, its EMA, AdamW)
      step              optimizer steps taken
      config            asdict(sm.Config): sample.py and compare.py rebuild the model from it
      args              `record`: train.py's flags, plus `classes` (the data's class names),
                        `latent` (a latent folder's meta.json, None in pixel mode), `held_out`
                        (an id of the held-out split) and `world` (the number of ranks)
      saliency_mean     (N,) or None: the residual routing target's per-position baseline"""
    ckpt = dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                config=asdict(model.cfg), args=record, saliency_mean=saliency_mean)
    with atomic(path) as tmp:
        torch.save(ckpt, tmp)


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


def load_model(path, weights="ema", device="cpu"):
    """(model in eval mode, the train.py arguments that made it) from a checkpoint."""
    ckpt = load_checkpoint(path)
    if weights not in ckpt:
        raise UserError(f"checkpoint {path} has no {weights!r} weights")
    model = sm.DiT(checkpoint_config(ckpt, path))
    load_weights(model, ckpt[weights], path)
    return model.to(device).eval(), ckpt.get("args", {})


def load_reference(path, cfg, weights="ema", device="cpu"):
    """The dense model of the reference view (its rollout is routed by the MoE checkpoints of
    config cfg): refused in one line unless it is dense and of the same data's shapes."""
    ref, _ = load_model(path, weights, device)
    if ref.moe_layers() or (ref.cfg.in_channels, ref.cfg.image_size, ref.cfg.num_classes) != \
            (cfg.in_channels, cfg.image_size, cfg.num_classes):
        raise UserError(f"--reference {path} must be a dense model trained on the same data "
                        "(train.py --router dense with the same data flags)")
    return ref


# ----------------------------------------------------------------------------------------------
# Images and .npz files

def to_uint8(x):
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as DiT's sample_ddp does."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_npz(path, **arrays):
    """np.savez with fixed zip timestamps, so that the same arrays give the same bytes; atomic."""
    with atomic(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, a in arrays.items():
            with z.open(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(a))
