"""Tests of the scripts and helpers (train.py, sample.py, fid.py, latents.py, compare.py, data.py,
common.py): CPU only, tiny configs, subprocesses for the command lines and torchrun."""
import hashlib
from copy import deepcopy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import sharpmoe as sm
import train
from common import RECIPES, UserError, save_npz, to_uint8
from data import (HELD_OUT, ImageFolder, data_flags, LatentFolder, Shapes, Strokes, center_crop, decode, encode, load_vae, make_datasets,
                  position_saliency)

HERE = os.path.dirname(os.path.abspath(__file__))


def run_cli(*args, torchrun=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [sys.executable]
    return subprocess.run(cmd + ["train.py", *args], cwd=HERE, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------------
# train.py: training, resume, torchrun

def train_args(out, *extra):
    """train.py's flags for a tiny run (a model from --init keeps its own size)."""
    model = [] if "--init" in extra else ["--preset", "tiny"]
    return train.parse_args([*model, "--steps", "4", "--global-batch-size", "8", "--num-workers", "0", "--log-every", "2",
                             "--ckpt-every", "2", "--builtin-size", "64", "--probe-images", "16", "--out", str(out), *extra])


@pytest.mark.parametrize("extra", [("--router", "diffmoe"), ("--init", "PRE", "--trajectory-steps", "3"),
                                   ("--init", "PRE", "--trajectory-steps", "3", "--routing-mass", "count",
                                    "--routing-scope", "step", "--saliency-target", "residual")])
def test_resume_continues_exactly(tmp_path, extra):
    pre = tmp_path / "pre"
    train.main(train_args(pre, "--router", "ec", "--steps", "2"))
    extra = [str(pre / "last.pt") if a == "PRE" else a for a in extra]
    train.main(train_args(tmp_path / "a", *extra))             # uninterrupted, 4 steps
    train.main(train_args(tmp_path / "b", *extra, "--steps", "2"))  # "killed" after 2 steps
    train.main(train_args(tmp_path / "b", *extra, "--resume", str(tmp_path / "b" / "last.pt")))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name
    log = lambda run: [l.split("img/s")[0] for l in open(tmp_path / run / "log.txt") if l.startswith("step")]
    assert log("a")[-1] == log("b")[-1]                        # the same logged loss after resuming
    model = sm.DiT(sm.Config(**b["config"]))                   # config travels with the weights
    model.load_state_dict(b["ema"])


def test_resuming_a_finished_run_trains_and_logs_nothing(tmp_path, capsys):
    train.main(train_args(tmp_path, "--steps", "2"))
    log, ckpt = (tmp_path / "log.txt").read_text(), (tmp_path / "last.pt").read_bytes()
    train.main(train_args(tmp_path, "--steps", "2", "--resume", str(tmp_path / "last.pt")))
    assert (tmp_path / "log.txt").read_text() == log and (tmp_path / "last.pt").read_bytes() == ckpt
    assert "is at step 2 of --steps 2; nothing to train" in capsys.readouterr().out


RANK_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {here!r})
import train
model, ema = train.main(train.parse_args(sys.argv[1:]))
torch.save(dict(model=model.state_dict(), ema=ema.state_dict()), os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
"""


def torchrun_states(tmp_path, *args):
    """Run train.py's main under torchrun (2 gloo processes); return each rank's final state."""
    script = tmp_path / "rank_main.py"
    script.write_text(RANK_SCRIPT.format(here=HERE, out=str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script), *args],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_states_equal(a, b, **tol):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], msg=f"{key} {name}", **tol)


@pytest.mark.parametrize("router", sm.ROUTERS)
def test_torchrun_two_processes_agree_with_each_other_and_with_one_process(tmp_path, router):
    """Both ranks end with the same weights and DiffMoE thresholds; and, except for DiffMoE
    (whose batch pool is each rank's own batch, as in DiffMoE), with what one process computes
    at the same global batch: a run does not depend on the number of ranks."""
    args = ["--preset", "tiny", "--router", router, "--steps", "3", "--global-batch-size", "8", "--num-workers", "0",
            "--log-every", "1", "--builtin-size", "64", "--probe-images", "16", "--lr", "1e-3"]
    rank0, rank1 = torchrun_states(tmp_path, *args, "--out", str(tmp_path / "two"))
    assert_states_equal(rank0, rank1, rtol=0, atol=0)
    assert torch.load(tmp_path / "two" / "last.pt", weights_only=True)["step"] == 3
    if router == "diffmoe":
        assert (rank0["model"]["blocks.1.ffn.thresholds"] != 0).all()
        return
    model, ema = train.main(train.parse_args(args + ["--out", str(tmp_path / "one")]))
    assert_states_equal(dict(model=model.state_dict(), ema=ema.state_dict()), rank0, rtol=1e-4, atol=1e-6)


def test_post_training_under_torchrun_agrees_with_one_process(tmp_path):
    train.main(train_args(tmp_path / "pre", "--router", "ec", "--steps", "2"))
    args = ["--init", str(tmp_path / "pre" / "last.pt"), "--trajectory-steps", "3", "--steps", "2", "--lr", "1e-3",
            "--routing-weight", "1", "--global-batch-size", "8", "--num-workers", "0", "--builtin-size", "64",
            "--probe-images", "16"]
    rank0, rank1 = torchrun_states(tmp_path, *args, "--out", str(tmp_path / "two"))
    assert_states_equal(rank0, rank1, rtol=0, atol=0)
    model, ema = train.main(train.parse_args(args + ["--out", str(tmp_path / "one")]))
    assert_states_equal(dict(model=model.state_dict(), ema=ema.state_dict()), rank0, rtol=1e-4, atol=1e-6)
    ckpt = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert ckpt["config"]["sharpmoe"] and any("sal_router" in k for k in ckpt["ema"])
    sm.DiT(sm.Config(**ckpt["config"])).load_state_dict(ckpt["ema"])   # no extra flag to load


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line

def test_bad_inputs_give_clear_errors(tmp_path):
    def fails(match, *args):
        with pytest.raises(UserError, match=match):
            train.main(train_args(tmp_path / "run", *args))
    fails("does not exist", "--data", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    fails("has no images", "--data", str(tmp_path / "empty"))
    fails("not divisible by patch size", "--image-size", "30")
    fails("unknown preset 'huge'", "--preset", "huge")
    fails("unknown router 'soft'", "--router", "soft")
    fails("fewer than --global-batch-size", "--builtin-size", "4")
    fails("give ec experts no capacity", "--num-experts", "128")
    train.main(train_args(tmp_path / "ec", "--router", "ec", "--steps", "1"))
    fails(r"other flags: --router ec \(now tc\)", "--router", "tc", "--resume", str(tmp_path / "ec" / "last.pt"))
    other = torch.load(tmp_path / "ec" / "last.pt", weights_only=True)   # same flags, another config
    other["config"]["sal_hidden"] = 7
    torch.save(other, tmp_path / "other.pt")
    fails(r"another config \(sal_hidden: 7 != 64\)", "--router", "ec", "--resume", str(tmp_path / "other.pt"))
    train.main(train_args(tmp_path / "sharp", "--init", str(tmp_path / "ec" / "last.pt"), "--trajectory-steps", "2", "--steps", "1"))
    fails("already a SharpMoE model", "--init", str(tmp_path / "sharp" / "last.pt"), "--sharpmoe", "off")
    old = torch.load(tmp_path / "ec" / "last.pt", weights_only=True)   # a checkpoint of an older version
    old["config"]["routing_temp"] = 1.0
    old["model"] = {k.replace("pre_router", "router"): v for k, v in old["model"].items()}
    torch.save(old, tmp_path / "old.pt")
    fails("another version of sharpmoe .config fields unknown here: routing_temp", "--init", str(tmp_path / "old.pt"))
    del old["config"]["routing_temp"]
    torch.save(old, tmp_path / "old.pt")
    fails(r"does not fit this model \(first mismatching weights: blocks.1.ffn.pre_router.weight, "
          "blocks.1.ffn.router.weight", "--init", str(tmp_path / "old.pt"))


def test_nonsense_flags_and_broken_checkpoints_are_refused_in_one_line(tmp_path):
    def fails(match, *args):
        with pytest.raises(UserError, match=match):
            train.main(train_args(tmp_path / "run", *args))
    for flag, value, says in (("--global-batch-size", "0", "at least 1"), ("--global-batch-size", "-8", "at least 1"),
                              ("--steps", "0", "at least 1"), ("--lr", "nan", "positive number"),
                              ("--lr", "inf", "positive number"), ("--ema", "1", r"in \[0, 1\)"),
                              ("--ema", "-0.1", r"in \[0, 1\)")):
        fails(f"{flag} {value} must .*{says}", flag, value)
    good = tmp_path / "good"
    train.main(train_args(good, "--steps", "2"))
    init = ("--init", str(good / "last.pt"))
    for flag, value, says in (("--trajectory-steps", "0", "at least 2"), ("--trajectory-steps", "1", "step 1 has no x0_hat"),
                              ("--routing-weight", "-1", "0 or more"), ("--routing-temp", "0", "positive")):
        fails(f"{flag} {value} must .*{says}", flag, value, *init)
    for flags in (("--routing-mass", "count"), ("--oracle",), ("--sharpmoe", "off"), ("--sal-hidden", "8"),
                  ("--backward", "unrolled"), ("--trajectory-steps", "3")):   # without --init: refused, not ignored
        fails(f"{flags[0]}: post-training flags, for a run from --init", *flags)
    ckpt = (good / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(ckpt[:len(ckpt) // 2])
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    for bad in ("truncated.pt", "random.pt"):
        for flag in ("--init", "--resume"):
            with pytest.raises(UserError, match=f"{bad} is not a readable train.py checkpoint") as e:
                train.main(train_args(tmp_path / "run2", flag, str(tmp_path / bad)))
            assert "weights_only=False" not in str(e.value)    # never pass torch's unsafe advice on
    fails(r"was run with other flags: --weight-decay 0.0 \(now 0.1\)", "--weight-decay", "0.1", "--resume", str(good / "last.pt"))
    fails(r"was run with other flags: --global-batch-size 8 \(now 16\)", "--global-batch-size", "16",
          "--resume", str(good / "last.pt"))
    post = tmp_path / "post"
    train.main(train_args(post, "--init", str(good / "last.pt"), "--trajectory-steps", "2", "--steps", "1"))
    fails(r"other flags: .*--init .*last.pt \(now None\)", "--preset", "L", "--resume", str(post / "last.pt"))


def test_a_diverged_run_stops_before_saving_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = sm.flow_loss, []

    def nan_on_third_call(*args):
        calls.append(1)
        loss, aux, routes = real(*args)
        return (loss * float("nan") if len(calls) == 3 else loss), aux, routes
    monkeypatch.setattr(sm, "flow_loss", nan_on_third_call)
    with pytest.raises(UserError, match="became NaN or infinite at step 3: training diverged"):
        train.main(train_args(tmp_path, "--ckpt-every", "1", "--log-every", "1"))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert "nan" not in open(tmp_path / "log.txt").read()
    monkeypatch.setattr(sm, "flow_loss", real)
    train.main(train_args(tmp_path, "--ckpt-every", "1", "--log-every", "1", "--resume", str(tmp_path / "last.pt")))
    log = open(tmp_path / "log.txt").read()
    assert f"RESUMED from {tmp_path}/last.pt" in log and "step 2 of 4" in log


def test_unreadable_image_names_the_file_in_one_line(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(np.full((40, 48, 3), 20 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "2.png").write_bytes(b"not a png")
    r = run_cli("--preset", "tiny", "--data", str(tmp_path), "--steps", "6", "--global-batch-size", "8",
                "--num-workers", "1", "--out", str(tmp_path / "run"))   # inside the data: refused
    assert r.stderr.strip().endswith("would be read as a class folder; put the run elsewhere")
    r = run_cli("--preset", "tiny", "--data", str(tmp_path), "--steps", "6", "--global-batch-size", "8",
                "--num-workers", "1", "--out", str(tmp_path.parent / (tmp_path.name + "-run")))   # 3 epochs: the bad image is read
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == f"error: cannot read image {tmp_path}/dog/2.png (UnidentifiedImageError); fix or remove it"
    assert "Traceback" not in r.stderr


def test_global_batch_not_divisible_by_world_size_is_said_once(tmp_path):
    r = run_cli("--preset", "tiny", "--global-batch-size", "7", "--steps", "1", "--out", str(tmp_path), torchrun=True)
    assert r.returncode != 0
    assert r.stderr.count("error: --global-batch-size 7 is not divisible by the world size 2; use a multiple of 2") == 1
    assert "train.py\", line" not in r.stderr                 # (torchrun prints its own summary)


def test_the_cpu_recipe_fills_what_the_command_line_leaves_open_and_model_flags_need_no_init():
    cpu = RECIPES["cpu"]
    pre = train.parse_args(["--recipe", "cpu", "--lr", "2e-3"])
    assert (pre.preset, pre.global_batch_size, pre.lr, pre.grad_clip, pre.ema, pre.steps, pre.log_every) == \
        ("cpu", 32, 2e-3, 1.0, cpu["ema"][0], cpu["steps"][0], cpu["log_every"][0])   # the given --lr wins
    assert (pre.warmup, pre.t_sampling, pre.builtin, pre.image_size) == (cpu["warmup"][0], "logit-normal", "glyphs", 16)
    post = train.parse_args(["--recipe", "cpu", "--init", "x.pt"])
    assert (post.preset, post.lr, post.ema, post.steps, post.trajectory_steps, post.log_every, post.warmup) == \
        (None, cpu["lr"][1], cpu["ema"][1], cpu["steps"][1], 4, cpu["log_every"][1], 0)
    paper, paper_post = train.parse_args([]), train.parse_args(["--init", "x.pt"])
    assert (paper.preset, paper.router, paper.global_batch_size, paper.lr, paper.ema, paper.steps) == \
        ("L", "ec", 256, 1e-4, 0.9999, 500_000)
    assert (paper_post.ema, paper_post.steps, paper_post.trajectory_steps, paper_post.routing_weight,
            paper_post.routing_mass) == (0.9999, 100_000, 10, 0.001, "gate")
    assert paper.trajectory_steps is paper.routing_weight is None   # pretraining has no post-training flags
    for flags in (["--router", "tc"], ["--preset", "S", "--top-k", "2"]):
        with pytest.raises(UserError, match=f"--init .*x.pt brings its own model; drop {flags[0]}"):
            train.parse_args(["--init", "x.pt", *flags])


# ----------------------------------------------------------------------------------------------
# data.py

def test_folder_data_center_crop_by_hand(tmp_path):
    """ADM's crop: BOX halvings while the short side is >= 2x the target, a BICUBIC resize of the
    short side to the target, the center. Three images: 128x64 of 32 column bands (band k has
    value 8 k): two halvings give 32x16 with column k = 8 k exactly, and the crop keeps columns
    8..23; a portrait one with one bright row (BOX and BICUBIC differ there), cropped vertically;
    one that needs a real BICUBIC resize (48x24 -> 32x16)."""
    bands = np.repeat(8 * np.arange(32, dtype=np.uint8), 4)[None, :, None].repeat(64, 0).repeat(3, 2)   # (64, 128, 3)
    portrait = np.zeros((128, 64, 3), np.uint8)
    portrait[70] = 255
    small = np.random.default_rng(0).integers(0, 256, (24, 48, 3), dtype=np.uint8)
    for name, img in (("a", bands), ("b", portrait), ("c", small)):
        (tmp_path / name).mkdir()
        Image.fromarray(img).save(tmp_path / name / "x.png")
    data = ImageFolder(str(tmp_path), 16)
    x = [data[i][0] for i in range(3)]
    assert [data[i][1] for i in range(3)] == [0, 1, 2]
    assert torch.equal(x[0], (torch.arange(8, 24, dtype=torch.float32) * 8 / 127.5 - 1).expand(3, 16, 16))
    as_x = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    halved = Image.fromarray(portrait).reduce(2).reduce(2)      # (16 wide, 32 high): rows 8..23 kept
    assert torch.equal(x[1], as_x(halved.crop((0, 8, 16, 24))))
    assert torch.equal(x[2], as_x(Image.fromarray(small).resize((32, 16), Image.BICUBIC).crop((8, 0, 24, 16))))


def test_position_saliency_is_the_flip_symmetric_mean():
    data = Strokes(32, 40)
    mean = position_saliency(data, 4, batch=16)
    M = sm.laplacian_saliency(torch.stack([data[i][0] for i in range(40)]), 4).mean(0).view(8, 8)
    torch.testing.assert_close(mean, ((M + M.flip(-1)) / 2).flatten())


def test_held_out_images_are_never_trained_on(tmp_path):
    args = train_args(tmp_path, "--builtin-size", "64")
    data, held_out = make_datasets(**data_flags(vars(args)))
    seen = {data[i][0].numpy().tobytes() for i in range(len(data))}
    assert not seen & {held_out[i][0].numpy().tobytes() for i in range(64)}
    for c in ("a", "b"):                                        # a folder: images split off
        (tmp_path / c).mkdir()
        for i in range(300):
            Image.fromarray(np.full((8, 8, 3), i % 256, np.uint8)).save(tmp_path / c / f"{i}.png")
    data, held_out = make_datasets(data=str(tmp_path), image_size=8)
    assert len(held_out) == 60 and len(data) == 540                # a tenth
    assert not set(data.index) & set(held_out.index) and {held_out[i][1] for i in range(60)} == {0, 1}


def test_flips_mirror_pixels_and_pick_the_mirror_latents():
    x, flip = torch.randn(3, 3, 4, 4), torch.tensor([True, False, True])
    assert torch.equal(train.apply_flip(x, flip), torch.stack([x[0].flip(-1), x[1], x[2].flip(-1)]))
    pairs = torch.randn(3, 2, 4, 2, 2)                          # (B, [image, mirror], C, s, s)
    assert torch.equal(train.apply_flip(pairs, flip), torch.stack([pairs[0, 1], pairs[1, 0], pairs[2, 1]]))


# ----------------------------------------------------------------------------------------------
# Folders, images and paths as people have them

def image_tree(root, classes=("cat", "dog"), n=12, size=(40, 48)):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((*size, 3), 20 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_hidden_entries_are_not_data_anywhere(tmp_path):
    root = image_tree(tmp_path / "data")
    (root / ".ipynb_checkpoints").mkdir()                      # a notebook server's folder, with an image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".ipynb_checkpoints" / "x.png")
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")   # a Mac's resource fork
    (root / "cat" / ".DS_Store").write_bytes(b"Bud1")
    folder = ImageFolder(str(root), 16)
    assert folder.classes == ["cat", "dog"] and len(folder) == 24 and all(folder[i][0].shape == (3, 16, 16) for i in (0, 23))
    assert len(fid.image_files(str(root / "cat"))) == 12
    model, _ = train.main(train_args(tmp_path / "run", "--data", str(root), "--steps", "1", "--image-size", "16"))
    assert model.cfg.num_classes == 2
    import latents
    latents.main(latents.parse_args([str(root), str(tmp_path / "ref.npz"), "--fid-batch", "--image-size", "16",
                                     "--num-workers", "0"]))
    with np.load(tmp_path / "ref.npz") as f:
        assert f["arr_0"].shape[0] == 24 and set(f["labels"].tolist()) == {0, 1}


def test_an_empty_class_folder_is_refused_by_name_unless_allowed(tmp_path):
    root = image_tree(tmp_path / "data")
    (root / "bird").mkdir()
    with pytest.raises(UserError, match="class folders without images: bird; remove them, or pass --allow-empty-classes"):
        train.main(train_args(tmp_path / "a", "--data", str(root), "--image-size", "16"))
    model, _ = train.main(train_args(tmp_path / "b", "--data", str(root), "--image-size", "16", "--steps", "1",
                                     "--allow-empty-classes"))
    assert model.cfg.num_classes == 3


def write_modes(root):
    """One 32x32 constant image per bit depth: (file, its value as 8-bit, as [-1, 1])."""
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, img, u8 in (("one-bit.png", Image.new("1", (32, 32), 1), 255),
                          ("gray8.png", Image.new("L", (32, 32), 100), 100),
                          ("rgb8.png", Image.new("RGB", (32, 32), (100, 100, 100)), 100),
                          ("palette.png", Image.new("RGB", (32, 32), (100, 100, 100)).convert("P", palette=Image.ADAPTIVE), 100),
                          ("gray16-8192.png", Image.fromarray(np.full((32, 32), 8192, np.uint16)), 32),
                          ("gray16-32768.png", Image.fromarray(np.full((32, 32), 32768, np.uint16)), 128),
                          ("gray16-60000.png", Image.fromarray(np.full((32, 32), 60000, np.uint16)), 233),
                          ("int32.tif", Image.fromarray(np.full((32, 32), 32768, np.int32)), 128),
                          ("float.tif", Image.fromarray(np.full((32, 32), 0.25, np.float32)), 64)):
        img.save(root / name)
        cases.append((root / name, u8))
    return cases


def test_every_bit_depth_reaches_the_model_in_range_and_fid_reads_the_same(tmp_path):
    from data import read_rgb
    cases = write_modes(tmp_path / "modes")
    for path, u8 in cases:
        ours = np.asarray(read_rgb(path))
        assert (ours == u8).all(), (path.name, ours[0, 0], u8)
    theirs = np.concatenate(list(fid.folder_batches(str(tmp_path / "modes"), 4)))   # sorted by name
    assert [u8 for _, u8 in sorted(cases)] == [int(a[0, 0, 0]) for a in theirs]
    Image.fromarray(np.full((8, 8), 2.0, np.float32)).save(tmp_path / "bright.tif")
    Image.fromarray(np.full((8, 8), 100_000, np.int32)).save(tmp_path / "wide.tif")
    for name, says in (("bright.tif", r"mode F with values outside \[0, 1\]"), ("wide.tif", "mode I with values outside")):
        with pytest.raises(UserError, match=f"cannot read image .*{name} \\(ValueError: {says}"):
            read_rgb(tmp_path / name)
    root = tmp_path / "gray16" / "a"                            # the three images, in training
    root.mkdir(parents=True)
    for v in (8192, 32768, 60000):
        Image.fromarray(np.full((32, 32), v, np.uint16)).save(root / f"{v:05d}.png")
    values = [float(ImageFolder(str(root.parent), 32)[i][0].mean()) for i in range(3)]
    assert values == pytest.approx([-0.749, 0.004, 0.827], abs=0.002)


def test_a_truncated_image_is_one_line_before_any_work_in_fid(tmp_path):
    image_tree(tmp_path, ("imgs",), n=3, size=(16, 16))
    png = (tmp_path / "imgs" / "1.png").read_bytes()
    (tmp_path / "imgs" / "1.png").write_bytes(png[:len(png) // 2])
    r = subprocess.run([sys.executable, "fid.py", str(tmp_path / "imgs"), "--inception-weights", str(tmp_path / "none.pth")],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot read image {tmp_path}/imgs/1.png (")


def random_inception_weights(tmp_path):
    """A weight file of the FID network with random weights, named with its sha256 prefix."""
    torch.manual_seed(0)
    raw = tmp_path / "w.pth"
    torch.save(fid.FIDInception().state_dict(), raw)
    weights = tmp_path / f"w-{hashlib.sha256(raw.read_bytes()).hexdigest()[:8]}.pth"
    raw.rename(weights)
    return weights


def test_save_stats_prints_the_file_it_writes_and_takes_the_name_back(tmp_path):
    weights = random_inception_weights(tmp_path)
    save_npz(str(tmp_path / "a.npz"), arr_0=np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    run = lambda *a: subprocess.run([sys.executable, "fid.py", "--inception-weights", str(weights), *a],
                                    cwd=HERE, capture_output=True, text=True, timeout=300)
    r = run(str(tmp_path / "a.npz"), "--save-stats", str(tmp_path / "refstats"))
    assert r.returncode == 0 and f"wrote {tmp_path}/refstats.npz (mu, sigma)" in r.stdout
    r = run(str(tmp_path / "a.npz"), str(tmp_path / "refstats"))
    assert r.returncode == 0, r.stderr[-500:]
    assert float([l for l in r.stdout.splitlines() if l.startswith("FID")][0].split()[1]) == pytest.approx(0, abs=1e-3)


def test_an_output_path_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.setattr(train, "make_datasets", lambda **kw: pytest.fail("data was built first"))
    with pytest.raises(UserError, match=r"--out .*/f is a file, not a folder; pass a folder"):
        train.main(train_args(tmp_path / "f"))
    with pytest.raises(UserError, match=r"--out .*/f/run: .*/f is a file, not a folder"):
        train.main(train_args(tmp_path / "f" / "run"))         # a folder inside a file
    import compare
    import latents
    import sample
    with pytest.raises(UserError, match="is a file, not a folder"):
        sample.parse_args(["--ckpt", "x.pt", "--out", str(tmp_path / "f")])
    with pytest.raises(UserError, match="is a file, not a folder"):
        latents.parse_args([str(tmp_path), str(tmp_path / "f")])
    with pytest.raises(UserError, match="is a file, not a folder"):
        compare.parse_args(["--init", "x.pt", "--results", str(tmp_path / "f")])


def test_paths_a_run_records_resolve_from_another_folder(tmp_path, monkeypatch, tiny_vae):
    import shutil
    import latents
    image_tree(tmp_path / "work" / "images", n=4, size=(32, 32))
    shutil.copytree(tiny_vae, tmp_path / "work" / "vae")
    monkeypatch.chdir(tmp_path / "work")                      # every path below relative to here
    latents.main(latents.parse_args(["images", "lat", "--vae", "vae", "--image-size", "32", "--num-workers", "0"]))
    meta = json.load(open("lat/meta.json"))
    assert meta["vae"] == str(tmp_path / "work" / "vae")
    train.main(train_args("run", "--data", "lat", "--global-batch-size", "4", "--steps", "1", "--probe-images", "2"))
    args = torch.load("run/last.pt", weights_only=True)["args"]
    assert args["data"] == str(tmp_path / "work" / "lat") and args["latent"]["vae"] == str(tmp_path / "work" / "vae")
    monkeypatch.chdir(tmp_path)                                # and from elsewhere: the report finds both
    import sample
    sample.main(sample.parse_args(["--ckpt", "work/run/last.pt", "--sample-steps", "1", "--grid", "0", "--report", "noised",
                                   "--report-images", "2", "--out", "s"]))
    assert (tmp_path / "s" / "report_noised.json").exists()
    from diffusers import AutoencoderKL                        # a VAE with another scale: refused, both named
    other = AutoencoderKL.from_pretrained(str(tmp_path / "work" / "vae"))
    other.register_to_config(scaling_factor=0.5)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="scales latents by 0.5, the model's latent data by 0.18215"):
        sample.main(sample.parse_args(["--ckpt", "work/run/last.pt", "--sample-steps", "1", "--grid", "1", "--vae",
                                       str(tmp_path / "other"), "--out", "s"]))


def test_fewer_samples_than_ranks_and_a_bad_image_under_torchrun(tmp_path, sharp_ckpt):
    args = ["--ckpt", str(sharp_ckpt), "--sample-steps", "2", "--num-samples", "1", "--grid", "0"]
    r = run_sample(*args, "--out", str(tmp_path / "two"), torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_sample(*args, "--out", str(tmp_path / "one")).returncode == 0
    assert (tmp_path / "two" / "samples.npz").read_bytes() == (tmp_path / "one" / "samples.npz").read_bytes()
    assert sorted(os.listdir(tmp_path / "two")) == ["samples.npz"]   # no stray parts
    root = image_tree(tmp_path / "data", n=8, size=(16, 16))
    (root / "dog" / "2.png").write_bytes(b"not a png")
    r = run_cli("--preset", "tiny", "--data", str(root), "--image-size", "16", "--steps", "6", "--global-batch-size", "4",
                "--num-workers", "0", "--probe-images", "4", "--out", str(tmp_path / "run"), torchrun=True)
    assert r.returncode != 0
    assert r.stderr.count(f"cannot read image {root}/dog/2.png (UnidentifiedImageError); fix or remove it") == 1
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr   # the other rank is quiet


# ----------------------------------------------------------------------------------------------
# sample.py

@pytest.fixture(scope="module")
def sharp_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    train.main(train_args(out / "pre", "--router", "ec", "--steps", "2"))
    train.main(train_args(out / "post", "--init", str(out / "pre" / "last.pt"), "--trajectory-steps", "2", "--steps", "1"))
    return out / "post" / "last.pt"


def run_sample(*args, torchrun=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [sys.executable]
    return subprocess.run(cmd + ["sample.py", *args], cwd=HERE, capture_output=True, text=True, timeout=300)


def test_sample_py_grid_npz_deterministic_and_report(tmp_path, sharp_ckpt):
    import sample
    common = ["--ckpt", str(sharp_ckpt), "--sample-steps", "4", "--num-samples", "6", "--batch-size", "4", "--grid", "4"]
    sample.main(sample.parse_args(common + ["--out", str(tmp_path / "a"), "--report", "rollout", "--report-images", "4"]))
    sample.main(sample.parse_args(common + ["--out", str(tmp_path / "b"), "--grid", "0"]))
    a, b = (tmp_path / "a" / "samples.npz").read_bytes(), (tmp_path / "b" / "samples.npz").read_bytes()
    assert a == b                                               # the same command, the same file
    with np.load(tmp_path / "a" / "samples.npz") as f:
        assert f["arr_0"].shape == (6, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    assert Image.open(tmp_path / "a" / "grid.png").size[0] > 4 * 32
    report = json.load(open(tmp_path / "a" / "report_rollout.json"))
    assert len(report["t"]) == len(report["rank_correlation"]) == 4 and report["sharpmoe"]
    assert len(report["count_by_saliency_quintile"]) == 4
    assert all(v == 1.0 for v in report["experts_per_token_per_layer"])   # ec: k = 1 on average
    assert Image.open(tmp_path / "a" / "report_rollout.png").size[1] > 4 * 32
    sample.main(sample.parse_args(["--ckpt", str(sharp_ckpt), "--sample-steps", "3", "--grid", "0", "--report",
                                   "noised", "--report-images", "4", "--out", str(tmp_path / "a")]))
    assert json.load(open(tmp_path / "a" / "report_noised.json"))["what"] == "noised"
    train.main(train_args(tmp_path / "dense", "--router", "dense", "--steps", "1"))
    sample.main(sample.parse_args(["--ckpt", str(sharp_ckpt), "--sample-steps", "3", "--grid", "0", "--report", "reference",
                                   "--reference", str(tmp_path / "dense" / "last.pt"), "--report-images", "4", "--out", str(tmp_path / "a")]))
    reference = json.load(open(tmp_path / "a" / "report_reference.json"))
    assert reference["what"] == "reference" and len(reference["position_controlled_correlation"]) == 3


def test_sample_py_refuses_bad_input_in_one_line(tmp_path, sharp_ckpt):
    import sample
    (tmp_path / "truncated.pt").write_bytes(sharp_ckpt.read_bytes()[:5000])
    (tmp_path / "a_file").write_text("x")
    base = ["--ckpt", str(sharp_ckpt), "--sample-steps", "2", "--out", str(tmp_path / "out")]
    for args, says in ((["--num-samples", "-1"], "--num-samples -1 must be 0 or more"),
                       (["--grid", "-1"], "--grid -1 must be 0"), (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
                       (["--cfg-scale", "-1"], "--cfg-scale -1.0 must be 0 or more"),
                       (["--out", str(tmp_path / "a_file")], "a_file is a file, not a folder; pass a folder")):
        with pytest.raises(UserError, match=says):
            sample.main(sample.parse_args(base + args))
    with pytest.raises(UserError, match="truncated.pt is not a readable train.py checkpoint"):
        sample.main(sample.parse_args(["--ckpt", str(tmp_path / "truncated.pt")]))


def test_sample_py_under_torchrun_matches_one_process(tmp_path, sharp_ckpt):
    args = ["--ckpt", str(sharp_ckpt), "--sample-steps", "3", "--num-samples", "5", "--grid", "0"]
    r = run_sample(*args, "--out", str(tmp_path / "two"), torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_sample(*args, "--out", str(tmp_path / "one")).returncode == 0
    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        assert np.abs(one["arr_0"].astype(int) - two["arr_0"].astype(int)).max() <= 1
        assert np.array_equal(one["arr_1"], two["arr_1"])


# ----------------------------------------------------------------------------------------------
# fid.py

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=3), rng.normal(size=3)
    A = rng.normal(size=(3, 3))
    S = A @ A.T + np.eye(3)
    assert fid.frechet_distance(mu1, S, mu2, S) == pytest.approx(((mu1 - mu2) ** 2).sum(), abs=1e-9)
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])          # commuting (diagonal)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-9)
    S1, S2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 3.0]])   # S1 S2 != S2 S1
    # for 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))
    tr_root = np.sqrt(np.trace(S1 @ S2) + 2 * np.sqrt(np.linalg.det(S1) * np.linalg.det(S2)))
    assert fid.frechet_distance(np.zeros(2), S1, np.zeros(2), S2) == pytest.approx(np.trace(S1) + np.trace(S2) - 2 * tr_root, abs=1e-9)
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, abs=1e-9)   # 1-D
    x, y = rng.normal(size=(500, 8)), rng.normal(size=(500, 8)) * 2 + 1
    assert abs(fid.frechet_distance(*fid.statistics(x), *fid.statistics(x))) < 1e-8
    assert fid.frechet_distance(*fid.statistics(x), *fid.statistics(y)) == \
        pytest.approx(fid.frechet_distance(*fid.statistics(y), *fid.statistics(x)), rel=1e-9)


def test_inception_layout_matches_the_committed_manifest():
    rows = [l.split() for l in open(os.path.join(HERE, "inception_keys.txt")) if not l.startswith("#")]
    manifest = {k: tuple(int(s) for s in shape.split("x")) for k, shape in rows}
    net = fid.FIDInception()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == manifest
    assert sum(k.endswith("conv.weight") for k in manifest) == 94
    # torchvision's Inception3 has 27,161,264 parameters; less its aux head (3,326,696), plus
    # 8 more classes (8 * 2049), gives the FID network's count.
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049


def test_inception_loads_strictly_checks_sha_and_is_batch_invariant(tmp_path):
    torch.manual_seed(0)
    net = fid.FIDInception()
    state = dict(net.state_dict(), **{"Conv2d_1a_3x3.bn.num_batches_tracked": torch.tensor(0)})
    raw = tmp_path / "w.pth"
    torch.save(state, raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    good, bad = tmp_path / f"w-{digest[:8]}.pth", tmp_path / "w-00000000.pth"
    raw.rename(good)
    bad.write_bytes(good.read_bytes())
    with pytest.raises(fid.UserError, match="corrupt or not the published file"):
        fid.load_inception(str(bad))
    for name, broken, says in (("missing", {k: v for k, v in state.items() if k != "fc.bias"}, "missing weights: fc.bias;"),
                               ("extra", dict(state, **{"AuxLogits.fc.weight": torch.zeros(1)}), "extra: AuxLogits.fc.weight")):
        torch.save(broken, raw)
        named = tmp_path / f"{name}-{hashlib.sha256(raw.read_bytes()).hexdigest()[:8]}.pth"
        raw.rename(named)
        with pytest.raises(fid.UserError, match=f"not the FID Inception network .*{says}"):
            fid.load_inception(str(named))
    loaded = fid.load_inception(str(good))
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        pool4, logits4 = loaded(images)
        pool1 = torch.cat([loaded(images[i:i + 1])[0] for i in range(4)])
    assert pool4.shape == (4, 2048) and logits4.shape == (4, 1008)
    torch.testing.assert_close(pool1, pool4, rtol=1e-5, atol=1e-6)


def test_tf_bilinear_resize_by_hand():
    up = fid.tf_resize_matrix(2, 4)                             # samples at 0, 0.5, 1, 1.5
    assert torch.equal(up, torch.tensor([[1, 0], [0.5, 0.5], [0, 1], [0, 1]], dtype=torch.float64))
    down = fid.tf_resize_matrix(4, 2)                           # samples at 0 and 2
    assert torch.equal(down, torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.float64))
    img = torch.tensor([[0, 128], [255, 64]], dtype=torch.uint8).view(1, 2, 2, 1).expand(1, 2, 2, 3)
    x = fid.FIDInception.preprocess(img)                  # (1, 3, 299, 299)
    assert x.shape == (1, 3, 299, 299)
    assert x[0, 0, 0, 0] == (0 - 128) / 128 and x[0, 0, 298, 298] == (64 - 128) / 128
    src = 150 * 2 / 299                                         # output row 150 samples row 1.003
    assert x[0, 0, 150, 0].item() == pytest.approx(((1 - (src - 1)) * 255 + (src - 1) * 255 - 128) / 128)


def test_npz_and_folder_inputs_round_trip(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    save_npz(str(tmp_path / "s.npz"), arr_0=arr)
    with np.load(tmp_path / "s.npz") as f:
        assert np.array_equal(f["arr_0"], arr)                  # a standard .npz
    assert np.array_equal(np.concatenate(list(fid.npz_batches(str(tmp_path / "s.npz"), 3))), arr)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # torch warns on read-only arrays
        torch.from_numpy(next(fid.npz_batches(str(tmp_path / "s.npz"), 3)))
    (tmp_path / "imgs").mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp_path / "imgs" / f"{i}.png")
    assert np.array_equal(np.concatenate(list(fid.folder_batches(str(tmp_path / "imgs"), 4))), arr)


def test_inception_score_and_sample_count_checks(tmp_path):
    assert fid.inception_score(np.zeros((100, 1008)))[0] == pytest.approx(1.0)
    peaked = np.eye(1008)[np.arange(100) % 10] * 50             # confident, 10 classes evenly
    assert fid.inception_score(peaked, splits=1)[0] == pytest.approx(10.0, rel=1e-3)
    save_npz(str(tmp_path / "one.npz"), arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(fid.UserError, match="FID needs at least 2"):
        fid.features(None, str(tmp_path / "one.npz"), 10, "cpu")
    with pytest.warns(UserWarning, match="feature dimensions"):
        fid.statistics(np.random.default_rng(0).normal(size=(10, 2048)))
    np.savez(tmp_path / "ref.npz", mu=np.ones(3), sigma=np.eye(3), arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    mu, sigma = fid.reference_stats(None, str(tmp_path / "ref.npz"), 10, "cpu")   # stored, not recomputed
    assert np.array_equal(mu, np.ones(3)) and np.array_equal(sigma, np.eye(3))


def reference_inception_score(logits, splits=10):
    """improved-GAN's loop: split at i * N // splits, exp of the mean KL(p(y|x) || p(y))."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    N, scores = len(p), []
    for i in range(splits):
        part = p[i * N // splits:(i + 1) * N // splits]
        py = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(py))).sum(1).mean()))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("N", [11, 61, 64])
def test_inception_score_splits_like_the_references(N):
    logits = np.random.default_rng(N).normal(size=(N, 1008)) * 3
    np.testing.assert_allclose(fid.inception_score(logits), reference_inception_score(logits), rtol=1e-9)


def test_is_logits_have_no_bias_and_statistics_match_numpy():
    torch.manual_seed(0)
    net = fid.FIDInception().eval()
    torch.nn.init.normal_(net.fc.bias)                          # a bias that must not count
    with torch.no_grad():
        pool3, logits = net(torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8))
    torch.testing.assert_close(logits, pool3 @ net.fc.weight.t())
    feats = np.random.default_rng(1).normal(size=(300, 7)).astype(np.float32)
    mu, sigma = fid.statistics(feats, chunk=64)
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


def test_fid_inputs_are_checked_before_any_work(tmp_path):
    rng = np.random.default_rng(0)
    save_npz(str(tmp_path / "s.npz"), arr_0=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "labels_only.npz", arr_1=np.arange(3))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    (tmp_path / "not_zip.npz").write_bytes(b"hello")
    for path, role, says in (("labels_only.npz", "samples", "has no arr_0"), ("labels_only.npz", "reference", "has no arr_0"),
                             ("not_zip.npz", "samples", "neither an image folder nor an .npz"),
                             ("stats.npz", "samples", r"it is a reference, and fid.py takes the samples first: python fid.py SAMPLES")):
        with pytest.raises(fid.UserError, match=says):
            fid.check_input(str(tmp_path / path), role)
    assert fid.check_input(str(tmp_path / "stats.npz"), "reference") is None and fid.check_input(str(tmp_path / "s.npz"), "samples") == 3
    with pytest.raises(fid.UserError, match="different dimensions .2048 and 3."):
        fid.frechet_distance(np.zeros(2048), np.eye(2048), np.zeros(3), np.eye(3))
    (tmp_path / "mixed").mkdir()                                # one behaviour, whatever the batch size
    for i, size in enumerate((8, 8, 8, 9)):
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(tmp_path / "mixed" / f"{i}.png")
    for batch_size in (1, 50):
        with pytest.raises(fid.UserError, match=r"differ in size \(8x8 .*0.png, 9x9 .*3.png\)"):
            fid.features(None, str(tmp_path / "mixed"), batch_size, "cpu")


def test_fid_cli_end_to_end_with_random_weights(tmp_path):
    weights = random_inception_weights(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        save_npz(str(tmp_path / f"{name}.npz"), arr_0=rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    run = lambda *a: subprocess.run([sys.executable, "fid.py", "--inception-weights", str(weights), "--batch-size", "2", *a],
                                    cwd=HERE, capture_output=True, text=True, timeout=300)
    r1 = run(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert "Inception Score" in r1.stdout and "FID" in r1.stdout
    r2 = run(str(tmp_path / "b.npz"), "--save-stats", str(tmp_path / "b_stats.npz"))
    r3 = run(str(tmp_path / "a.npz"), str(tmp_path / "b_stats.npz"))    # stored stats: the same FID
    assert r2.returncode == r3.returncode == 0
    fid_line = lambda r: [l for l in r.stdout.splitlines() if l.startswith("FID")][0].split()[1]
    assert fid_line(r1) == fid_line(r3)
    r4 = run(str(tmp_path / "missing.npz"))
    assert r4.returncode != 0 and r4.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/missing.npz does not exist"
    np.savez(tmp_path / "labels.npz", arr_1=np.arange(3))
    r5 = run(str(tmp_path / "a.npz"), str(tmp_path / "labels.npz"))     # a bad REF: refused before any work
    assert r5.returncode != 0 and "Inception Score" not in r5.stdout and "has no arr_0" in r5.stderr
    r6 = run(str(tmp_path / "a.npz"), "--batch-size", "0")
    assert r6.returncode != 0 and r6.stderr.strip().splitlines()[-1] == "error: --batch-size 0 must be at least 1"


# ----------------------------------------------------------------------------------------------
# compare.py

def test_compare_trains_each_budget_by_continuing_one_run_measures_three_views_and_resumes(tmp_path, monkeypatch):
    import compare
    train.main(train_args(tmp_path / "pre", "--router", "ec", "--steps", "2"))
    train.main(train_args(tmp_path / "dense", "--router", "dense", "--steps", "2"))
    import classifier
    classifier.main(classifier.parse_args(["--out", str(tmp_path / "clf"), "--builtin-size", "256", "--epochs", "1", "--image-size", "32",
                                           "--ref-images", "16"]))
    argv = ["--init", str(tmp_path / "pre" / "last.pt"), "--reference", str(tmp_path / "dense" / "last.pt"),
            "--out", str(tmp_path / "cmp"), "--results", str(tmp_path / "res"), "--budgets", "2", "1", "--seeds", "0",
            "--settings", "paper", "control-steps", "control-compute", "count-oracle", "--num-workers", "0", "--eval-images", "8",
            "--rollout-images", "4", "--sample-steps", "3", "--builtin-size", "64", "--probe-images", "8", "--log-every", "1",
            "--quality-samples", "4", "--classifier", str(tmp_path / "clf" / "classifier.pt")]
    results = compare.main(compare.parse_args(argv))["ec"]
    run = lambda name, steps: torch.load(tmp_path / "cmp" / "ec" / "seed0" / name / f"step{steps}.pt", weights_only=True)
    assert run("control", 4)["step"] == 4 and run("control", 8)["step"] == 8   # control-compute: T = 4 times the budget
    assert results["runs"]["control-steps"][2] != results["runs"]["control-compute"][1]   # one run, steps 2 and 4
    log = open(tmp_path / "cmp" / "ec" / "seed0" / "paper" / "log.txt").read()
    assert "RESUMED" in log and "step 1 of 2" in log            # budget 2 continued the budget-1 run
    paper, oracle = results["runs"]["paper"][2][0], results["runs"]["count-oracle"][1][0]
    assert set(paper) == {"noised", "rollout", "reference", "quality"} and len(paper["rollout"]["t"]) == 3
    assert set(oracle) == {"noised", "reference"}               # an oracle has no rollout (nor samples) of its own
    assert set(paper["quality"]) == {"1.0", "1.5"} and paper["quality"]["1.5"]["n"] == 4
    assert "rollout" in paper and len(paper["noised"]["compute"]) == len(sm.PROBE_T)   # experts per token per t
    assert len(paper["noised"]["corr_pos"]) == len(sm.PROBE_T) and len(paper["noised"]["quintiles"]) == 5
    table = open(tmp_path / "res" / "ec.md").read()
    assert "| 2 | paper |" in table and "### 1 steps, reference view: position-controlled correlation" in table
    accuracy, fd = paper["quality"]["1.5"]["accuracy"], paper["quality"]["1.5"]["fd"]
    assert f"| 2 | paper | {accuracy:.3f} | {fd:.2f} |" in table   # the quality table: cfg 1.5 first
    assert Image.open(tmp_path / "res" / "ec_budget.png").size[0] > 4 * 300
    claim = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
             for line in open(tmp_path / "res" / "claim.md").read().splitlines() if line.startswith("| ec ")}
    cols = ["pretrained", *compare.CLAIM_RUNS]
    assert claim[("ec 2", "early, rollout")][cols.index("paper")] == f"{compare.early(paper['rollout']):+.2f}"
    assert claim[("ec 1", "held-out loss")][cols.index("count-oracle")] == f"{np.mean(oracle['noised']['loss']):.4f}"
    assert claim[("ec 1", "early, noised")][cols.index("count")] == "-"   # a setting that did not run
    monkeypatch.setattr(compare.subprocess, "Popen", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(compare.Views, "measure", lambda *a, **k: pytest.fail("a snapshot was measured again"))
    again = compare.main(compare.parse_args(argv))["ec"]
    assert again["runs"]["paper"][2] == results["runs"]["paper"][2]   # measured once, cached
    order = [(b, run, steps) for b, run, _, steps in compare.schedule(compare.parse_args(argv), compare.settings(
        compare.parse_args(argv + ["--settings", "control-steps", "control-compute", "paper"])))]
    assert order == [(1, "control", 1), (1, "paper", 1), (2, "control", 2), (2, "control", 4), (2, "control", 8),
                     (2, "paper", 2)]                           # a run only goes forward: 4 waits for 2
    with pytest.raises(UserError, match="must be a pretrained tc, ec or diffmoe model"):
        compare.parse_args(["--init", str(tmp_path / "dense" / "last.pt")])


# ----------------------------------------------------------------------------------------------
# bench.py: the GPU check's parts run on the CPU; without a GPU the check says so

def test_gpu_check_says_so_without_a_gpu_and_its_parts_run_on_the_cpu_in_bf16(capsys):
    r = subprocess.run([sys.executable, "bench.py", "--gpu"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().splitlines() == [
        "bench.py --gpu: no GPU here (torch.cuda.is_available() is False); nothing to check"]
    import bench
    cpu = torch.device("cpu")
    bench.gpu_check(cpu, quick=True)                            # every part, bf16 where the GPU would use it
    out = capsys.readouterr().out
    assert all(f"\n{part}. " in out for part in "ABCDEFG")
    for router, sharp in (("dense", False), ("diffmoe", True)):
        assert bench.agreement(cpu, router, sharp, False) == (0.0, 0.0)   # fp32 against fp32 on one device
        v, grad = bench.agreement(cpu, router, sharp, True)    # bf16 autocast really ran, and stays close
        assert 1e-4 < v < 0.05 and 1e-4 < grad < 0.3
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", (9, 0), 132) == 989      # SXM, whatever its name says
    assert bench.peak_tflops("NVIDIA H100 PCIe", (9, 0), 114) == 756
    assert bench.peak_tflops("NVIDIA H100 NVL", (9, 0), 132) == 835
    assert bench.peak_tflops("NVIDIA GeForce GTX 1080", (6, 1), 20) is None
    mlp, x = sm.MLP(16, 64), torch.randn(3, 5, 16)              # MFU's numerator: counted FLOPs, by hand
    assert bench.gflops(lambda: mlp(x)) * 1e9 == pytest.approx(2 * 15 * (16 * 64 + 64 * 16))
    torch.manual_seed(0)
    for router, design in (("ec", bench.OneHotEC), ("diffmoe", bench.GatherStackDiffMoE)):   # the peers' designs:
        moe = sm.MoE(sm.Config(width=32, heads=4, router=router, num_experts=8)).train()  # the same layer
        x = torch.randn(4, 16, 32)
        ours, theirs = moe(x), design(deepcopy(moe))(x)
        torch.testing.assert_close(ours[0], theirs[0]), torch.testing.assert_close(ours[1], theirs[1])


# ----------------------------------------------------------------------------------------------
# Latent mode: latents.py with diffusers' AutoencoderKL (a tiny random one built from a config)

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=32)                         # 32 pixels -> 16x16x4 latents
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(10):
            img = np.full((40, 48, 3), 60 * (c == "dog"), np.uint8)
            img[rng.integers(0, 30):, rng.integers(0, 30):] = rng.integers(0, 256, 3)   # an edge somewhere
            Image.fromarray(img).save(root / c / f"{i}.png")
    return str(root)


def extract(image_folder, vae, out):
    import latents
    latents.main(latents.parse_args([image_folder, str(out), "--vae", vae, "--image-size", "32", "--batch-size", "4",
                                     "--num-workers", "0"]))
    return out


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory, tiny_vae, image_folder):
    return extract(image_folder, tiny_vae, tmp_path_factory.mktemp("latents") / "lat")


def test_extraction_encodes_each_image_and_its_mirror(latent_dir, tiny_vae, image_folder):
    lat, labels = np.load(latent_dir / "latents.npy"), np.load(latent_dir / "labels.npy")
    meta = json.load(open(latent_dir / "meta.json"))
    assert lat.shape == (20, 2, 4, 16, 16) and lat.dtype == np.float16 and labels.tolist() == [0] * 10 + [1] * 10
    assert meta == dict(vae=tiny_vae, scale=0.18215, image_size=32, latent_size=16, channels=4, count=20,
                        classes=["cat", "dog"])
    vae, x = load_vae(tiny_vae), ImageFolder(image_folder, 32)[13][0][None]   # center-cropped
    with torch.no_grad():                                       # posterior mean x 0.18215, image then mirror
        z = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.mean * 0.18215
        np.testing.assert_allclose(lat[13].astype(np.float32), z.numpy(), rtol=2e-3, atol=2e-3)
        assert not np.allclose(lat[13, 0], lat[13, 1], atol=1e-2)   # the mirror is not the image
        torch.testing.assert_close(decode(vae, encode(vae, x)),   # decode undoes the scaling
                                   vae.decode(vae.encode(x).latent_dist.mean).sample)
    pairs, single = LatentFolder(str(latent_dir)), LatentFolder(str(latent_dir), pairs=False)
    assert torch.equal(pairs[13][0], torch.from_numpy(lat[13].astype(np.float32))) and pairs[13][1] == 1
    assert torch.equal(single[13][0], torch.from_numpy(lat[13, 0].astype(np.float32)))
    views = torch.from_numpy(lat.astype(np.float32)).flatten(0, 1)   # training sees both: the residual baseline
    torch.testing.assert_close(position_saliency(pairs, 2, batch=8), sm.laplacian_saliency(views, 2).mean(0))


def test_a_killed_extraction_resumes_to_the_same_bytes(tmp_path, latent_dir, tiny_vae, image_folder, monkeypatch):
    import latents
    real, calls = latents.encode, []

    def dies_on_third_call(vae, x):                             # 1: the latent grid, 2: the first batch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(vae, x)
    monkeypatch.setattr(latents, "encode", dies_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        extract(image_folder, tiny_vae, tmp_path / "b")
    assert not (tmp_path / "b" / "meta.json").exists() and np.load(tmp_path / "b" / "done.npy").sum() == 4
    monkeypatch.setattr(latents, "encode", real)
    extract(image_folder, tiny_vae, tmp_path / "b")
    for f in ("latents.npy", "labels.npy", "meta.json"):
        assert (tmp_path / "b" / f).read_bytes() == (latent_dir / f).read_bytes(), f


def test_extraction_under_torchrun_gives_the_one_process_latents(tmp_path, latent_dir, tiny_vae, image_folder):
    out = tmp_path / "two"                                      # rank r encodes images r, r + 2, ...
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "latents.py", image_folder,
                        str(out), "--vae", tiny_vae, "--image-size", "32", "--batch-size", "3", "--num-workers", "0"],
                       cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("labels.npy", "meta.json"):
        assert (out / f).read_bytes() == (latent_dir / f).read_bytes(), f
    two, one = np.load(out / "latents.npy").astype(np.float32), np.load(latent_dir / "latents.npy").astype(np.float32)
    np.testing.assert_allclose(two, one, rtol=2e-3, atol=2e-3)   # other batches: float rounding only
    assert np.load(out / "done.npy").all()


def test_reference_batch_holds_the_training_crops_for_fid(tmp_path, image_folder):
    import fid
    import latents
    out = str(tmp_path / "ref.npz")
    latents.main(latents.parse_args([image_folder, out, "--fid-batch", "--image-size", "24", "--batch-size", "3",
                                     "--num-workers", "0"]))
    assert fid.check_input(out, "reference") == 20               # what fid.py takes, no VAE involved
    with np.load(out) as f:
        crop = np.asarray(center_crop(Image.open(f"{image_folder}/dog/3.png").convert("RGB"), 24))
        assert f["arr_0"].shape == (20, 24, 24, 3) and np.array_equal(f["arr_0"][13], crop)
        assert f["labels"].tolist() == [0] * 10 + [1] * 10
    with pytest.raises(UserError, match="--fid-batch writes an .npz file"):
        latents.parse_args([image_folder, str(tmp_path / "ref"), "--fid-batch"])


def test_latent_model_trains_post_trains_and_samples_decoded_images(tmp_path, latent_dir, tiny_vae):
    import sample
    train.main(train_args(tmp_path / "pre", "--data", str(latent_dir), "--global-batch-size", "6", "--steps", "3"))
    ckpt = torch.load(tmp_path / "pre" / "last.pt", weights_only=True)
    assert (ckpt["config"]["in_channels"], ckpt["config"]["image_size"]) == (4, 16)   # from meta.json, no flag
    assert ckpt["args"]["latent"]["vae"] == tiny_vae
    train.main(train_args(tmp_path / "post", "--data", str(latent_dir), "--global-batch-size", "6", "--steps", "1",
                          "--init", str(tmp_path / "pre" / "last.pt"), "--trajectory-steps", "2",
                          "--routing-mass", "count", "--saliency-target", "residual"))
    out = tmp_path / "samples"
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "post" / "last.pt"), "--sample-steps", "2", "--grid", "2",
                                   "--num-samples", "3", "--report", "noised", "--report-images", "2", "--out", str(out)]))
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 32, 32, 3) and f["arr_0"].dtype == np.uint8   # decoded to pixels
    report = json.load(open(out / "report_noised.json"))
    assert report["images"] == 2 and Image.open(out / "report_noised.png").size[1] > 2 * 128
    first = np.asarray(Image.open(out / "report_noised.png").convert("RGB"))[24:24 + 128:4, 4:4 + 128:4]
    held_out = make_datasets(data=str(latent_dir))[1]
    decoded = to_uint8(decode(load_vae(tiny_vae), held_out[0][0][None]))[0]
    assert np.abs(first.astype(int) - decoded).max() <= 1


def test_broken_latent_folders_and_missing_diffusers_get_one_line(tmp_path, latent_dir, monkeypatch):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(latent_dir, broken)
    (broken / "meta.json").unlink()
    with pytest.raises(UserError, match="has no meta.json: its extraction did not finish"):
        train.main(train_args(tmp_path / "run", "--data", str(broken)))
    shutil.copy(latent_dir / "meta.json", broken / "meta.json")
    np.save(broken / "labels.npy", np.zeros(7, np.int64))     # 7 labels for 20 latents
    with pytest.raises(UserError, match="the arrays disagree with meta.json"):
        train.main(train_args(tmp_path / "run", "--data", str(broken)))
    for labels, says in ((np.full(20, 5), "int64 labels from 5 to 5"), (np.full(20, -1), "int64 labels from -1 to -1"),
                         (np.full(20, 0.5), "float64 labels")):  # class 5 of 2, negative, not integers
        np.save(broken / "labels.npy", labels)
        with pytest.raises(UserError, match=f"labels.npy holds {says}.*not integers in 0..1 \\(its 2 classes\\)"):
            train.main(train_args(tmp_path / "run", "--data", str(broken)))
    monkeypatch.setitem(sys.modules, "diffusers", None)          # as if not installed
    with pytest.raises(UserError, match="latent mode needs diffusers: pip install diffusers"):
        load_vae("ema")
    monkeypatch.undo()
    missing = str(tmp_path / "no-such-vae")                      # neither a folder nor a valid Hub id: no network
    with pytest.raises(UserError, match=f"cannot load the VAE '{missing}' .* pass --vae /path/to/it"):
        load_vae(missing)


# ----------------------------------------------------------------------------------------------
# classifier.py and quality.py: sample quality at CPU scale

def test_classifier_measure_recognizes_real_images_and_sees_wrong_labels_and_noise(tmp_path, capsys):
    """A classifier trained by classifier.py (tiny: 33 steps) measures held-out real images near
    its noise floor and well above chance; the same images under wrong labels lose the accuracy
    but not the distance; noise loses both. fid.py --classifier prints the same numbers."""
    import classifier
    from quality import load_classifier, sample_quality
    acc = classifier.main(classifier.parse_args(["--out", str(tmp_path), "--builtin", "shapes", "--image-size", "32",
                                                 "--builtin-size", "1500", "--epochs", "3", "--ref-images", "300"]))
    assert f"held-out accuracy {acc:.3f} on 300 images" in capsys.readouterr().out
    clf, ckpt = load_classifier(str(tmp_path / "classifier.pt"))
    held = Shapes(32, 200, start=HELD_OUT + 5000)               # neither the reference nor the floor
    images = to_uint8(torch.stack([held[i][0] for i in range(200)]))
    labels = np.array([held[i][1] for i in range(200)])
    real, wrong = sample_quality(clf, ckpt, images, labels), sample_quality(clf, ckpt, images, (labels + 1) % 10)
    noise = sample_quality(clf, ckpt, np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8), labels)
    assert real["accuracy"] > 0.25 and wrong["accuracy"] < real["accuracy"] / 2 and noise["accuracy"] < 0.2
    assert real["fd"] < 2 * real["floor"] and wrong["fd"] == real["fd"] and noise["fd"] > 100 * real["floor"]
    assert real["floor"] == noise["floor"] > 0
    save_npz(str(tmp_path / "s.npz"), arr_0=images, arr_1=labels)
    r = subprocess.run([sys.executable, "fid.py", str(tmp_path / "s.npz"), "--classifier", str(tmp_path / "classifier.pt")],
                       cwd=HERE, capture_output=True, text=True)
    assert f"classifier Fréchet distance {real['fd']:.3f} (noise floor {real['floor']:.3f}" in r.stdout, r.stderr
    assert f"accuracy {real['accuracy']:.3f}" in r.stdout


# ----------------------------------------------------------------------------------------------
# Nothing silent, nothing lost: inputs changed under a run, other runs, signals, disks, non-numbers

def small_folder(root, classes=("cat", "dog"), n=8, size=16):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_a_run_continued_on_changed_data_is_refused_or_noted(tmp_path):
    """Renamed classes would swap the labels: refused for --resume and --init, naming them; images
    added move the held-out split: noted in the log; a SharpMoE --init keeps its R_sal config."""
    data = small_folder(tmp_path / "data")
    flags = ("--data", str(data), "--image-size", "16", "--global-batch-size", "4", "--steps", "2")
    train.main(train_args(tmp_path / "run", *flags))
    os.rename(data / "dog", data / "fox")
    for flag in ("--resume", "--init"):
        with pytest.raises(UserError, match=f"{flag} .*last.pt was trained on other classes \\('dog' is now 'fox'\\)"):
            train.main(train_args(tmp_path / ("run" if flag == "--resume" else "post"), *flags, "--steps", "3",
                                  flag, str(tmp_path / "run" / "last.pt")))
    os.rename(data / "fox", data / "dog")
    small_folder(data, n=12)                                    # 4 more images per class
    train.main(train_args(tmp_path / "run", *flags, "--steps", "3", "--resume", str(tmp_path / "run" / "last.pt")))
    assert "note: the held-out images differ from those of" in (tmp_path / "run" / "log.txt").read_text()
    sharp = tmp_path / "sharp"
    train.main(train_args(sharp, *flags[:6], "--steps", "1", "--init", str(tmp_path / "run" / "last.pt"),
                          "--trajectory-steps", "2", "--sal-position", "off", "--sal-hidden", "8"))
    with pytest.raises(UserError, match="already has R_sal \\(sal_hidden 8, sal_position off\\); drop --sal-position on"):
        train.main(train_args(tmp_path / "again", *flags[:6], "--init", str(sharp / "last.pt"), "--trajectory-steps",
                              "2", "--sal-position", "on"))
    train.main(train_args(tmp_path / "again", *flags[:6], "--steps", "1", "--init", str(sharp / "last.pt"),
                          "--trajectory-steps", "2"))
    config = torch.load(tmp_path / "again" / "last.pt", weights_only=True)["config"]
    assert (config["sal_hidden"], config["sal_position"]) == (8, False)   # the checkpoint's, not the defaults
    notes = train.check_same_data("x.pt", "--resume", dict(world=2), Strokes(32, 4), Strokes(32, 4, start=HELD_OUT), 1,
                                  "diffmoe")
    assert notes and "ran on 2 rank(s), this run on 1: DiffMoE's pool is each rank's batch" in notes[0]


def test_a_checkpoint_without_optimizer_or_ema_resumes_never_and_inits_with_a_note(tmp_path, capsys):
    train.main(train_args(tmp_path / "run", "--steps", "2"))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    torch.save(dict(model=ckpt["model"], config=ckpt["config"], args=ckpt["args"]), tmp_path / "shared.pt")
    with pytest.raises(UserError, match="shared.pt has no ema, opt, step .*post-train from it with --init instead"):
        train.main(train_args(tmp_path / "b", "--resume", str(tmp_path / "shared.pt")))
    train.main(train_args(tmp_path / "c", "--init", str(tmp_path / "shared.pt"), "--trajectory-steps", "2", "--steps", "1"))
    assert "has no EMA weights; the EMA starts from its model weights" in capsys.readouterr().out


def test_one_run_per_output_folder_and_sigterm_stops_the_children(tmp_path):
    """A second run into a folder another run holds gets one line. compare.py under SIGTERM (timeout,
    schedulers, kill) stops the train.py it started (no orphan writing on)."""
    from common import hold_lock
    with hold_lock(str(tmp_path / "run")):
        with pytest.raises(UserError, match=f"another run is writing into {tmp_path / 'run'} \\(process {os.getpid()}"):
            train.main(train_args(tmp_path / "run"))
    train.main(train_args(tmp_path / "pre", "--router", "ec", "--steps", "1"))
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "compare.py", "--init", str(tmp_path / "pre" / "last.pt"), "--out",
                             str(tmp_path / "cmp"), "--results", str(tmp_path / "res"), "--seeds", "0", "--budgets",
                             "100000", "--settings", "paper", "--num-workers", "0", "--eval-images", "8",
                             "--builtin-size", "64"], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = lambda: [p for p in os.listdir("/proc") if p.isdigit() and str(tmp_path / "cmp") in
                     open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace") and "train.py" in
                     open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")]
    for _ in range(600):                                        # until its train.py has started
        if child() or proc.poll() is not None:
            break
        time.sleep(0.1)
    pids = child()
    assert pids, "compare.py started no train.py"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(0.5)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]


def test_full_and_read_only_disks_say_so_in_one_line_and_lose_nothing(tmp_path, monkeypatch):
    import errno
    import common
    train.main(train_args(tmp_path / "run", "--steps", "2", "--ckpt-every", "1"))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):                             # what torch.save says when the disk fills up
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="cannot write .*last.pt: RuntimeError: .*file write failed .* GiB free on the disk"):
        train.main(train_args(tmp_path / "run", "--steps", "3", "--resume", str(tmp_path / "run" / "last.pt")))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before    # the last good one, intact
    assert not [f for f in os.listdir(tmp_path / "run") if ".tmp" in f]   # no half-written file left behind
    monkeypatch.undo()
    real_open = open

    def read_only(path, *a, **k):
        if ".write-test" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", read_only)
    for main, argv in ((train.main, train_args(tmp_path / "ro")),
                       (fid.main, None)):
        if argv is None:
            import argparse
            argv = argparse.Namespace(samples=str(tmp_path / "x.npz"), ref=None, batch_size=10, classifier=None,
                                      save_stats=str(tmp_path / "stats.npz"), inception_weights=None)
        with pytest.raises(UserError, match="cannot write .*: the disk is read-only"):
            main(argv)
    monkeypatch.undo()
    def broken_write(*a, **k):                                  # a statistics file cut off half-way
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np.lib.format, "write_array", broken_write)
    with pytest.raises(UserError, match="stats.npz: the disk is full"):
        common.save_npz(str(tmp_path / "stats.npz"), mu=np.zeros(3))
    assert not os.path.exists(tmp_path / "stats.npz") and not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_non_numbers_are_refused_where_they_enter(tmp_path, latent_dir, tiny_vae, monkeypatch):
    from data import read_rgb
    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(UserError, match=r"nan.tif \(ValueError: mode F with values that are not numbers"):
        read_rgb(tmp_path / "nan.tif")
    import shutil
    lat = tmp_path / "lat"
    shutil.copytree(latent_dir, lat)
    a = np.load(lat / "latents.npy", mmap_mode="r+")
    a[3, 0, 0, 0, 0] = np.nan
    a.flush()
    with pytest.raises(UserError, match="latent 3 is not a number \\(NaN or inf\\)"):
        list(LatentFolder(str(lat)))
    import latents
    monkeypatch.setattr(latents, "encode", lambda vae, x: torch.full((x.shape[0], 4, 16, 16), float("nan")))
    with pytest.raises(UserError, match="latents that are not numbers \\(NaN or inf\\) for .*0.png"):
        extract(str(small_folder(tmp_path / "imgs", size=32)), tiny_vae, tmp_path / "nanlat")
    monkeypatch.undo()
    with pytest.raises(UserError, match="--resume .*last.pt and a lower --lr|nothing was saved; rerun with a lower --lr"):
        def nan_loss(*a, **k):
            loss, aux, routes = real(*a, **k)
            return loss * float("nan"), aux, routes
        real = sm.flow_loss
        monkeypatch.setattr(sm, "flow_loss", nan_loss)
        train.main(train_args(tmp_path / "diverged"))


def test_fid_inputs_as_pytorch_fid_users_have_them_or_one_line_before_work(tmp_path):
    for c in ("a", "b"):                                       # an ImageNet-style folder
        small_folder(tmp_path / "nested", classes=(c,), n=3)
    run = lambda *a: subprocess.run([sys.executable, "fid.py", *a], cwd=HERE, capture_output=True, text=True)
    r = run(str(tmp_path / "nested"), "--inception-weights", str(tmp_path / "none.pth"))
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nested'} holds its images in subfolders (a, b), "
                                             "which fid.py would ignore: it reads the images at the top of a folder, "
                                             "as pytorch-fid does; pass one flat folder of images (or an .npz)"]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "nested" / "top.png")
    assert "also holds subfolders of images" in run(str(tmp_path / "nested")).stderr
    images = np.zeros((4, 8, 8, 3), np.uint8)
    save_npz(str(tmp_path / "good.npz"), arr_0=images)
    raw = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) // 2])
    import zipfile
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as z:   # a header that promises more than it holds
        z.writestr("arr_0.npy", raw[raw.index(b"\x93NUMPY"):][:200])
    with zipfile.ZipFile(tmp_path / "garbled.npz", "w") as z:
        z.writestr("arr_0.npy", b"not an array at all")
    for name, says in (("cut.npz", "neither an image folder nor an .npz file"), ("short.npz", "the file is truncated"),
                       ("garbled.npz", "not a readable .npz")):
        r = run(str(tmp_path / name), "--inception-weights", str(tmp_path / "none.pth"))
        assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, (name, r.stderr)


def test_environment_and_names_that_would_break_the_scripts():
    env = dict(os.environ, RANK="0")
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "train.py", "--preset", "tiny"], cwd=HERE, env=env, capture_output=True, text=True)
    assert r.stderr.strip().splitlines() == ["error: RANK is set but not WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
                                             "MASTER_PORT: start the script under torchrun (torchrun --nproc_per_node=N "
                                             "SCRIPT ...), or unset RANK for one process"]
    import sample
    out = os.path.join(HERE, "runs", "grid-test.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    sample.save_grid(np.zeros((3, 8, 8, 3), np.uint8), out, 3, ["two\nlines", "", "😀 中文\ttab"])
    assert Image.open(out).size[0] > 3 * 64
    os.remove(out)


def test_sampling_in_bf16_runs_on_the_cpu_and_stays_close_to_fp32(tmp_path, sharp_ckpt):
    """sample.py's GPU default, bf16 autocast, on the CPU: it runs and its uint8 samples stay
    within a few levels of fp32's."""
    import sample
    ckpt = torch.load(sharp_ckpt, weights_only=True)
    g = torch.Generator().manual_seed(0)
    for name, p in ckpt["ema"].items():                         # weights as after training: the output moves
        if "adaLN" in name or "final_layer.linear" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    torch.save(ckpt, tmp_path / "trained.pt")
    base = ["--ckpt", str(tmp_path / "trained.pt"), "--sample-steps", "4", "--num-samples", "4", "--grid", "0"]
    for precision in ("fp32", "bf16"):
        sample.main(sample.parse_args(base + ["--precision", precision, "--out", str(tmp_path / precision)]))
    with np.load(tmp_path / "fp32" / "samples.npz") as a, np.load(tmp_path / "bf16" / "samples.npz") as b:
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert 0 < diff.max() <= 8 and diff.mean() < 1


def test_atomic_writes_replace_a_file_whole(tmp_path):
    """A reader holding the old file keeps reading it whole while a new one is written: the new
    file replaces it (a rename), it is never overwritten in place."""
    from common import write_text
    path = tmp_path / "f.txt"
    write_text(str(path), "old")
    with open(path) as held:
        write_text(str(path), "new")
        assert held.read() == "old"
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]


def test_sweep_trains_measures_tables_and_resumes(tmp_path, monkeypatch):
    """sweep.py on a tiny setting: each step count a snapshot of one continued run, measured
    (accuracy, FD and floor at cfg 1.5 and 1.0) into results/sweep.md with a grid; rerun, it
    trains and measures nothing again."""
    import classifier
    import sweep
    classifier.main(classifier.parse_args(["--out", str(tmp_path / "clf"), "--builtin-size", "256", "--epochs", "1",
                                           "--ref-images", "16"]))              # the recipe's 16x16, as the sweep's runs
    monkeypatch.setattr(sweep, "SETTINGS", {"tiny": (["--preset", "tiny", "--builtin-size", "64", "--global-batch-size",
                                                      "8", "--num-workers", "0", "--probe-images", "4"], (1, 2))})
    argv = ["--settings", "tiny", "--out", str(tmp_path / "sw"), "--results", str(tmp_path / "res"), "--samples", "4",
            "--sample-steps", "2", "--classifier", str(tmp_path / "clf" / "classifier.pt")]
    sweep.main(sweep.parse_args(argv))
    table = (tmp_path / "res" / "sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[4].strip() for r in rows] == ["1", "2"]          # one run, measured at steps 1 and 2
    assert "Made by `python sweep.py --settings tiny --routers ec`" in table and "4 samples" in table   # what made it
    assert torch.load(tmp_path / "sw" / "tiny" / "ec" / "step2.pt", weights_only=True)["step"] == 2
    assert (tmp_path / "res" / "sweep" / "tiny-ec-2.png").exists()
    monkeypatch.setattr(sweep.subprocess, "Popen", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(sweep, "model_quality", lambda *a, **k: pytest.fail("measured again"))
    sweep.main(sweep.parse_args(argv))
    assert (tmp_path / "res" / "sweep.md").read_text() == table


def test_a_partial_extraction_resumes_only_with_its_own_source(tmp_path, tiny_vae):
    """latents.py records what made an extraction (source.json): resuming it with another VAE or
    after the images changed is refused in one line (it would mix two sources' latents)."""
    import shutil
    images = small_folder(tmp_path / "imgs", n=3, size=32)
    out = extract(str(images), tiny_vae, tmp_path / "lat")
    (out / "meta.json").unlink()                                # as if killed before the end
    other = tmp_path / "other-vae"
    shutil.copytree(tiny_vae, other)
    with pytest.raises(UserError, match="holds a partial extraction of another source \\(vae .*other-vae"):
        extract(str(images), str(other), out)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images / "cat" / "0.png")   # a changed image
    with pytest.raises(UserError, match="another source \\(files_sha1"):
        extract(str(images), tiny_vae, out)
