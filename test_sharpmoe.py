"""Tests for sharpmoe.py and train.py: CPU only, tiny configs. Run: python -m pytest -q"""
import hashlib
import json
import math
import os
import subprocess
import sys
from copy import deepcopy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sharpmoe as sm
import train

HERE = os.path.dirname(os.path.abspath(__file__))
MOE_ROUTERS = ("tc", "ec", "diffmoe")


def tiny(router="ec", **kw):
    return sm.make_config("tiny", router=router, num_classes=10, **kw)


def batch(n=4, size=32):
    data = train.Shapes(size, n=64)
    x = torch.stack([data[i][0] for i in range(n)])
    return x, torch.tensor([data[i][1] for i in range(n)])


def pretrained_like(model, seed=0):
    """Random nonzero adaLN / output weights, as after training: at init adaLN-Zero makes every
    block the identity and no gradient reaches the routers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def run_cli(*args, torchrun=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [sys.executable]
    return subprocess.run(cmd + ["train.py", *args], cwd=HERE, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------------
# The MoE layer

@pytest.mark.parametrize("router", MOE_ROUTERS)
def test_identical_experts_give_routed_mass_times_the_mlp(router):
    """E copies of one MLP: each token's output is its routed mass A_i (the sum of its selected
    gates) times the MLP's output. Sees the gate weighting, the selection and the dispatch."""
    torch.manual_seed(0)
    cfg = tiny(router, num_experts=4)
    moe, mlp = sm.MoE(cfg), sm.MLP(cfg.width, int(cfg.width * cfg.mlp_ratio))
    with torch.no_grad():
        moe.experts.w1.copy_(mlp.fc1.weight.t().expand_as(moe.experts.w1))
        moe.experts.b1.copy_(mlp.fc1.bias.expand_as(moe.experts.b1))
        moe.experts.w2.copy_(mlp.fc2.weight.t().expand_as(moe.experts.w2))
        moe.experts.b2.copy_(mlp.fc2.bias.expand_as(moe.experts.b2))
    x = torch.randn(3, cfg.num_tokens, cfg.width)
    out, _, (gates, mask) = moe(x)
    A = sm.routed_mass([(gates, mask)], router)                 # (B, N), the paper's gate mass
    assert A.min() < 0.9                                        # the gates really weight the output
    torch.testing.assert_close(out, A.unsqueeze(-1) * mlp(x), rtol=1e-5, atol=1e-5)


def reference_selection(router, gates, B, k, thresholds=None, scores=None):
    """Naive per-token / per-expert loops for each router's selection rule."""
    M, E = gates.shape
    N = M // B
    mask = torch.zeros(M, E, dtype=torch.bool)
    if router == "tc":
        for m in range(M):
            for e in sorted(range(E), key=lambda e: -gates[m, e].item())[:k]:
                mask[m, e] = True
    elif router == "ec":
        for b in range(B):
            for e in range(E):
                order = sorted(range(N), key=lambda i: -gates[b * N + i, e].item())
                for i in order[:N * k // E]:
                    mask[b * N + i, e] = True
    elif thresholds is None:                                   # diffmoe, training: batch pool
        for e in range(E):
            for m in sorted(range(M), key=lambda m: -gates[m, e].item())[:M * k // E]:
                mask[m, e] = True
    else:                                                      # diffmoe, inference
        for e in range(E):
            n = sum(int(scores[m, e] > thresholds[e]) for m in range(M))
            for m in sorted(range(M), key=lambda m: -gates[m, e].item())[:n]:
                mask[m, e] = True
    return mask


@pytest.mark.parametrize("router,training", [("tc", True), ("ec", True), ("diffmoe", True), ("diffmoe", False)])
def test_batched_dispatch_equals_per_token_loop(router, training):
    torch.manual_seed(1)
    cfg = tiny(router, top_k=2 if router == "tc" else 1)
    moe = sm.MoE(cfg).train(training)
    if router == "diffmoe":
        moe.thresholds.fill_(0.5)
    B, N, D = 3, cfg.num_tokens, cfg.width
    x = torch.randn(B, N, D)
    with torch.no_grad():
        out, _, (gates, mask) = moe(x)
        gates = gates.reshape(B * N, -1)
        scores = moe.capacity_predictor(x.reshape(B * N, D)).sigmoid() if router == "diffmoe" else None
    ref_mask = reference_selection(router, gates, B, cfg.top_k, None if training else moe.thresholds, scores)
    assert torch.equal(mask.reshape(B * N, -1), ref_mask)
    flat, ref = x.reshape(B * N, D), torch.zeros(B * N, D)
    for m in range(B * N):                                     # per token, per selected expert
        for e in ref_mask[m].nonzero().flatten().tolist():
            h = F.gelu(flat[m] @ moe.experts.w1[e] + moe.experts.b1[e])
            ref[m] += gates[m, e] * (h @ moe.experts.w2[e] + moe.experts.b2[e])
    torch.testing.assert_close(out.reshape(B * N, D), ref, rtol=1e-4, atol=1e-5)


def test_grouped_matmul_equals_expert_loop():
    torch.manual_seed(4)
    experts = sm.Experts(4, 16, 32)
    counts = torch.tensor([5, 0, 11, 3])                       # an empty expert included
    x = torch.randn(int(counts.sum()), 16)
    torch.testing.assert_close(experts.ragged(x, counts), experts.ragged_loop(x, counts))


@pytest.mark.parametrize("router", MOE_ROUTERS)
def test_each_rule_selects_its_top_gates_at_its_capacity(router):
    """In its candidate pool (a token's experts for tc, an image's tokens for ec, the batch's
    tokens for diffmoe), each chooser takes exactly its capacity, and no rejected candidate has
    a higher gate than a selected one."""
    torch.manual_seed(2)
    cfg = tiny(router, top_k=2)
    B, N, E = 4, cfg.num_tokens, cfg.num_experts
    _, _, (gates, mask) = sm.MoE(cfg).train()(torch.randn(B, N, cfg.width))
    torch.testing.assert_close(gates.sum(-1), torch.ones(B, N))   # a softmax over experts
    pool = {"tc": (2,), "ec": (1,), "diffmoe": (0, 1)}[router]  # dims a chooser picks among
    capacity = {"tc": 2, "ec": N * 2 // E, "diffmoe": B * N * 2 // E}[router]
    assert (mask.sum(pool) == capacity).all()
    weakest_in = torch.where(mask, gates, torch.inf).amin(pool)
    strongest_out = torch.where(mask, -torch.inf, gates).amax(pool)
    assert (weakest_in >= strongest_out).all()


def test_diffmoe_thresholds_are_an_ema_of_the_capacity_th_score():
    """After n training forwards on the same batch (predictor unchanged), each expert's threshold
    is (1 - decay^n) times the C-th highest capacity-predictor score of that expert."""
    torch.manual_seed(3)
    cfg = tiny("diffmoe", threshold_decay=0.9)
    moe = sm.MoE(cfg).train()
    x = torch.randn(2, cfg.num_tokens, cfg.width)
    for _ in range(5):
        moe(x)
    with torch.no_grad():
        scores = moe.capacity_predictor(x.reshape(-1, cfg.width)).sigmoid()   # (B*N, E)
    C = 2 * cfg.num_tokens // cfg.num_experts
    kth = scores.sort(dim=0, descending=True).values[C - 1]    # (E,)
    torch.testing.assert_close(moe.thresholds, (1 - 0.9 ** 5) * kth)


def test_diffmoe_inference_uses_thresholds_and_compute_moves_with_input():
    torch.manual_seed(3)
    cfg = tiny("diffmoe")
    moe = sm.MoE(cfg).eval()
    moe.thresholds.fill_(0.5)
    x = torch.randn(2, cfg.num_tokens, cfg.width)
    with torch.no_grad():
        scores = moe.capacity_predictor(x.reshape(-1, cfg.width)).sigmoid()
        _, _, (_, mask) = moe(x)
        assert torch.equal(mask.sum((0, 1)), (scores > moe.thresholds).sum(0))
        totals = {int(moe(x * scale)[2][1].sum()) for scale in (0.2, 1.0, 5.0)}
    assert len(totals) > 1                                     # compute depends on the input


# ----------------------------------------------------------------------------------------------
# The model, training and checkpoints

@pytest.mark.parametrize("router", sm.ROUTERS)
def test_adaln_zero_model_outputs_zero_at_init(router):
    model = sm.DiT(tiny(router))
    x, y = batch()
    v, _, routes = model(x, torch.rand(4), y)
    assert v.shape == x.shape and v.abs().max() == 0
    assert len(routes) == len(model.moe_layers()) == (0 if router == "dense" else 1)


def test_loss_falls_on_builtin_data():
    torch.manual_seed(0)
    cfg = tiny("ec")
    model = sm.DiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x, y = batch(32)
    losses = []
    for _ in range(60):
        loss, aux, _ = sm.flow_loss(model, cfg, x, y, sm.training_noise(cfg, 32))
        opt.zero_grad(); (loss + aux).backward(); opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def train_args(out, *extra):
    return train.parse_args(["--preset", "tiny", "--steps", "4", "--global-batch-size", "8",
                             "--num-workers", "0", "--log-every", "2", "--ckpt-every", "2",
                             "--builtin-size", "64", "--probe-images", "16", "--out", str(out), *extra])


@pytest.mark.parametrize("extra", [("--router", "diffmoe"), ("--init", "PRE", "--trajectory-steps", "3"),
                                   ("--init", "PRE", "--trajectory-steps", "3", "--routing-mass", "count",
                                    "--routing-target", "step", "--saliency-target", "residual")])
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


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line

def test_bad_inputs_give_clear_errors(tmp_path):
    def fails(match, *args):
        with pytest.raises(train.UserError, match=match):
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
        with pytest.raises(train.UserError, match=match):
            train.main(train_args(tmp_path / "run", *args))
    for flag, value, says in (("--global-batch-size", "0", "at least 1"), ("--global-batch-size", "-8", "at least 1"),
                              ("--steps", "0", "at least 1"), ("--trajectory-steps", "0", "at least 2"),
                              ("--trajectory-steps", "1", "step 1 has no x0_hat"), ("--lr", "nan", "positive number"),
                              ("--lr", "inf", "positive number"), ("--routing-weight", "-1", "0 or more"),
                              ("--ema", "1", r"in \[0, 1\)"), ("--ema", "-0.1", r"in \[0, 1\)")):
        fails(f"{flag} {value} must .*{says}", flag, value)
    good = tmp_path / "good"
    train.main(train_args(good, "--steps", "2"))
    ckpt = (good / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(ckpt[:len(ckpt) // 2])
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    for bad in ("truncated.pt", "random.pt"):
        for flag in ("--init", "--resume"):
            with pytest.raises(train.UserError, match=f"{bad} is not a readable train.py checkpoint") as e:
                train.main(train_args(tmp_path / "run2", flag, str(tmp_path / bad)))
            assert "weights_only=False" not in str(e.value)    # never pass torch's unsafe advice on
    fails(r"was run with other flags: --lr 0.0001 \(now 0.001\)", "--lr", "1e-3", "--resume", str(good / "last.pt"))
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
    with pytest.raises(train.UserError, match="became NaN or infinite at step 3: training diverged"):
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
                "--num-workers", "1", "--out", str(tmp_path / "run"))   # 3 epochs: the bad image is read
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == f"error: cannot read image {tmp_path}/dog/2.png (UnidentifiedImageError); fix or remove it"
    assert "Traceback" not in r.stderr


def test_global_batch_not_divisible_by_world_size_is_said_once(tmp_path):
    r = run_cli("--preset", "tiny", "--global-batch-size", "7", "--steps", "1", "--out", str(tmp_path), torchrun=True)
    assert r.returncode != 0
    assert r.stderr.count("error: --global-batch-size 7 is not divisible by the world size 2; use a multiple of 2") == 1
    assert "train.py\", line" not in r.stderr                 # (torchrun prints its own summary)


def test_help_shows_defaults():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert "AdamW learning rate (default: 0.0001)" in r.stdout and "EMA decay (default: 0.9999)" in r.stdout


def test_folder_data_center_crop(tmp_path):
    (tmp_path / "a").mkdir()
    img = np.zeros((64, 128, 3), np.uint8)
    img[:, 32:96] = 255                                        # the center square is white
    Image.fromarray(img).save(tmp_path / "a" / "x.png")
    data = train.ImageFolder(str(tmp_path), 16)
    x, y = data[0]
    assert x.shape == (3, 16, 16) and y == 0 and x.min() > 0.9


# ----------------------------------------------------------------------------------------------
# SharpMoE: the dual router, the trajectory step, saliency and the routing loss

@pytest.mark.parametrize("router", MOE_ROUTERS)
def test_adding_saliency_router_keeps_the_model_bitwise(router):
    torch.manual_seed(5)
    base = pretrained_like(sm.DiT(tiny(router)))
    sal = sm.add_saliency_routers(deepcopy(base))
    x, y = batch()
    t, x0_hat = torch.rand(4), torch.randn_like(x)
    for mode in (False, True):                                 # eval, then train
        base.train(mode), sal.train(mode)
        v0, _, _ = base(x, t, y)
        v1, _, _ = sal(x, t, y, x0_hat=x0_hat)
        assert torch.equal(v0, v1)
    assert sal.cfg.sharpmoe and not base.cfg.sharpmoe
    with pytest.raises(ValueError, match="routes with x0_hat"):  # never silently without R_sal
        sal(x, t, y)


@pytest.mark.parametrize("router", MOE_ROUTERS)
def test_saliency_router_output_layer_gets_gradient(router):
    torch.manual_seed(6)
    model = sm.add_saliency_routers(pretrained_like(sm.DiT(tiny(router))))
    x, y = batch()
    v, _, _ = model(x, torch.rand(4), y, x0_hat=x)
    v.pow(2).mean().backward()
    for layer in model.moe_layers():
        assert layer.sal_router.fc2.weight.grad.abs().sum() > 0
        assert layer.sal_router.fc1.weight.grad.abs().sum() == 0   # fc2 = 0 at the start


class Recorder(torch.nn.Module):
    """Wraps a model like DDP does (as .module) and records every call."""

    def __init__(self, model):
        super().__init__()
        self.module, self.calls = model, []

    def forward(self, x, t, y, x0_hat=None):
        v, aux, routes = self.module(x, t, y, x0_hat=x0_hat)
        self.calls.append((x, t, x0_hat, v))
        return v, aux, routes


def test_trajectory_chains_detached_x0_hat():
    torch.manual_seed(7)
    cfg = tiny("ec", sharpmoe=True)
    rec = Recorder(pretrained_like(sm.DiT(cfg)))
    x0, y = batch()
    loss, _, stats = sm.trajectory_loss(rec, cfg, x0, y, sm.training_noise(cfg, 4, T=5))
    assert len(rec.calls) == 5 and stats["counts"].shape == (5, 4, cfg.num_tokens)
    x1, t1, hat1, _ = rec.calls[0]
    assert torch.equal(hat1, x1) and (t1 == 0.999).all()       # step 1 routes with x_{t_1}
    eps = (x1 - (1 - t1.view(-1, 1, 1, 1)) * x0) / t1.view(-1, 1, 1, 1)
    for (xp, tp, _, vp), (xk, tk, hatk, _) in zip(rec.calls, rec.calls[1:]):
        assert (tk < tp).all()
        torch.testing.assert_close(xk, (1 - tk.view(-1, 1, 1, 1)) * x0 + tk.view(-1, 1, 1, 1) * eps)
        torch.testing.assert_close(hatk, xp - tp.view(-1, 1, 1, 1) * vp)   # x0_hat = x_t - t v
        assert not hatk.requires_grad
    loss.backward()


def test_trajectory_timesteps_descend_from_0999_one_per_bin():
    torch.manual_seed(8)
    t = sm.trajectory_timesteps(10, 500)
    assert t.shape == (10, 500) and (t[0] == 0.999).all()
    assert (t[1:] < t[:-1]).all() and (t >= 0).all()
    bins = torch.floor((0.999 - t[1:]) / (0.999 / 9))          # bin k holds step k + 1
    assert torch.equal(bins, torch.arange(9.).view(9, 1).expand(9, 500))


def test_laplacian_saliency_flat_is_zero_and_edge_is_concentrated():
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert sm.laplacian_saliency(flat, 4).abs().max() == 0
    edge = flat.clone()
    edge[..., 16:] = -0.5                                      # a vertical edge between columns 15 | 16
    M = sm.laplacian_saliency(edge, 4).view(8, 8)              # (grid rows, grid cols)
    assert (M[:, 3:5] > 0).all() and (M[:, :3] == 0).all() and (M[:, 5:] == 0).all()


def test_routing_loss_by_hand():
    """A = (0, 0, 3) and M = (0, 1, 2) standardize (sample std) to a = (-1, -1, 2) / sqrt(3) and
    m = (-1, 0, 1); the loss is KL(p || q) = sum p log(p / q) with p = softmax(a / temp) and
    q = softmax(m / temp): 0.044010 at temp 1 and 0.054869 at temp 0.5, computed by hand below.
    (The reversed KL gives 0.050371, no standardization 0.176848.)"""
    def kl(a, m):
        p = [math.exp(v) / sum(math.exp(u) for u in a) for v in a]
        q = [math.exp(v) / sum(math.exp(u) for u in m) for v in m]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    a, m = [-1 / math.sqrt(3), -1 / math.sqrt(3), 2 / math.sqrt(3)], [-1.0, 0.0, 1.0]
    A, M = torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 1.0, 2.0]])
    assert kl(a, m) == pytest.approx(0.044010, abs=1e-6)
    assert sm.routing_loss(A, M).item() == pytest.approx(kl(a, m), abs=1e-5)
    assert sm.routing_loss(A, M, temp=0.5).item() == pytest.approx(kl([2 * v for v in a], [2 * v for v in m]), abs=1e-5)
    assert sm.routing_loss(A.repeat(3, 1), M.repeat(3, 1)).item() == pytest.approx(kl(a, m), abs=1e-5)   # mean


def test_routing_loss_prefers_saliency_and_reaches_both_routers():
    torch.manual_seed(9)
    M = torch.rand(4, 64)
    follow, oppose = sm.routing_loss(M, M), sm.routing_loss(-M, M)
    assert follow < 1e-6 < oppose
    assert sm.routing_loss(M + 0.1 * torch.randn(4, 64), M) < oppose
    model = sm.add_saliency_routers(pretrained_like(sm.DiT(tiny("ec"))))
    x, y = batch()
    _, _, routes = model(x, torch.full((4,), 0.5), y, x0_hat=x)
    sm.routing_loss(sm.routed_mass(routes, "ec"), sm.laplacian_saliency(x, 4)).backward()
    for layer in model.moe_layers():
        assert layer.pre_router.weight.grad.abs().sum() > 0
        assert layer.sal_router.fc2.weight.grad.abs().sum() > 0


def test_post_training_lowers_the_routing_loss_through_r_sal_alone():
    """With everything but R_sal frozen, and R_sal given the true x0 (--oracle, so that there is
    something to learn at this toy scale), post-training lowers the routing loss: the loss moves
    through R_sal. (The routed MASS following saliency does not make expert COUNTS follow it;
    see README, "Mass is not count".)"""
    torch.manual_seed(10)
    base = pretrained_like(sm.DiT(tiny("ec")))
    model = sm.add_saliency_routers(deepcopy(base))
    for name, p in model.named_parameters():
        p.requires_grad_("sal_router" in name)
    x, y = batch(16)
    fixed = sm.training_noise(model.cfg, 16, T=3, generator=torch.Generator().manual_seed(11))

    def routing(m):
        with torch.no_grad():
            return sm.trajectory_loss(m, m.cfg, x, y, fixed, oracle=True)[2]["routing"].item()

    before = routing(model)
    assert before == routing(base)                              # R_sal starts at zero
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(30):
        noise = sm.training_noise(model.cfg, 16, T=3)
        loss, aux, _ = sm.trajectory_loss(model, model.cfg, x, y, noise, lam=10.0, oracle=True)
        opt.zero_grad(); (loss + aux).backward(); opt.step()
    assert routing(model) < 0.7 * before


def select_ec(S, k):
    """EC selection mask (B, N, E) from logits (B, N, E)."""
    B, N, E = S.shape
    slots = sm.expert_choice_in_image(S.softmax(-1).reshape(B * N, E), B, N * k // E)
    return sm.slots_to_mask(slots, B * N).view(B, N, E)


def count_after_push(S, mask, b, i, mass, rule="ec", k=1, size=1.0):
    """Token (b, i)'s expert count after a step of `size` of its logits along the gradient of
    its own routed mass A_i (None when that gradient is zero)."""
    S_ = S.clone().requires_grad_()
    sm.routed_mass([(S_.softmax(-1), mask)], rule, mass)[b, i].backward()
    g = S_.grad[b, i]
    if g.norm() == 0:
        return None
    S2 = S.clone()
    S2[b, i] += size * g / g.norm()
    if rule == "ec":
        return int(select_ec(S2, k).sum(-1)[b, i])
    B, N, E = S.shape
    slots = sm.expert_choice_in_pool(S2.softmax(-1).reshape(B * N, E), B * N * k // E)
    return int(sm.slots_to_mask(slots, B * N).view(B, N, E).sum(-1)[b, i])


def test_count_mass_gradient_raises_a_count_that_the_gate_mass_gradient_lowers():
    """One image, EC, 8 tokens, 4 experts, k = 2 (4 tokens per expert). Token 4 has 2 experts,
    one of them by a small margin. Stepping its logits up the gradient of its own A: the paper's
    gate mass moves its gate onto the expert that chose it most and loses the marginal one
    (2 -> 1); the count-aware mass raises its gates where it is near a cut (2 -> 3)."""
    S = torch.tensor([[[-1.6, 1.4, -2.0, -1.7], [-1.8, 1.8, -1.6, -0.2], [-1.4, 0.5, -0.9, -0.4],
                       [1.5, -1.1, -0.3, -0.6], [-2.3, -0.7, -1.3, 0.8], [0.0, -0.1, 1.6, 1.3],
                       [0.7, -0.7, 0.2, 4.1], [0.2, 1.7, 0.5, 2.6]]])
    mask = select_ec(S, k=2)
    assert int(mask.sum(-1)[0, 4]) == 2
    assert count_after_push(S, mask, 0, 4, "gate", k=2) == 1
    assert count_after_push(S, mask, 0, 4, "count", k=2) == 3


@pytest.mark.parametrize("rule", ("ec", "diffmoe"))
def test_gate_mass_can_never_add_an_expert_and_the_count_mass_often_does(rule):
    """For every token of a random batch, the same push as above: the gate mass only moves a
    token's mass onto experts that already chose it (and a token with no expert gets no gradient
    at all), so no count rises; the count-aware mass raises many counts and lowers almost none."""
    torch.manual_seed(13)
    S = torch.randn(2, 32, 8)
    g = S.softmax(-1).reshape(64, 8)
    slots = sm.expert_choice_in_image(g, 2, 4) if rule == "ec" else sm.expert_choice_in_pool(g, 8)
    mask = sm.slots_to_mask(slots, 64).view(2, 32, 8)
    before = mask.sum(-1)
    moved = {"gate": [0, 0], "count": [0, 0]}                   # [raised, lowered]
    for mass in moved:
        for b in range(2):
            for i in range(32):
                c = count_after_push(S, mask, b, i, mass, rule, size=0.3)
                if c is not None:
                    moved[mass][0] += c > before[b, i]
                    moved[mass][1] += c < before[b, i]
    assert moved["gate"][0] == 0
    assert moved["count"][0] >= 16 and moved["count"][1] <= 2


def test_routing_targets_step_and_residual_by_hand():
    """target "step" is the mean over steps of KL(softmax(A_k) || softmax(M)); "trajectory" one KL
    on the sum; saliency_mean turns M into M - mean. Checked against the unrolled routes."""
    torch.manual_seed(14)
    model = sm.add_saliency_routers(pretrained_like(sm.DiT(tiny("ec"))))
    x0, y = batch(4)
    noise = sm.training_noise(model.cfg, 4, T=3)
    prior = torch.rand(model.cfg.num_tokens)
    with torch.no_grad():
        y_in = sm.drop_labels(y, noise[2], model.cfg.num_classes)
        As = [sm.routed_mass(r, "ec", "count") for *_, r in sm.unroll(model, x0, y_in, noise[0], noise[1])]
        M = sm.laplacian_saliency(x0, 4)
        for target, mean, expected in (("trajectory", None, sm.routing_loss(sum(As), M)),
                                       ("step", None, sum(sm.routing_loss(A, M) for A in As) / 3),
                                       ("step", prior, sum(sm.routing_loss(A, M - prior) for A in As) / 3)):
            stats = sm.trajectory_loss(model, model.cfg, x0, y, noise, mass="count", target=target, saliency_mean=mean)[2]
            torch.testing.assert_close(stats["routing"], expected)


def test_position_saliency_is_the_flip_symmetric_mean():
    data = train.Strokes(32, 40)
    mean = train.position_saliency(data, 4, batch=16)
    M = sm.laplacian_saliency(torch.stack([data[i][0] for i in range(40)]), 4).mean(0).view(8, 8)
    torch.testing.assert_close(mean, ((M + M.flip(-1)) / 2).flatten())


def test_held_out_images_are_never_trained_on(tmp_path):
    args = train_args(tmp_path, "--builtin-size", "64")
    data, held_out = train.make_datasets(args)
    seen = {data[i][0].numpy().tobytes() for i in range(len(data))}
    assert not seen & {held_out[i][0].numpy().tobytes() for i in range(64)}
    for c in ("a", "b"):                                        # a folder: images split off
        (tmp_path / c).mkdir()
        for i in range(300):
            Image.fromarray(np.full((8, 8, 3), i % 256, np.uint8)).save(tmp_path / c / f"{i}.png")
    data, held_out = train.make_datasets(train_args(tmp_path, "--data", str(tmp_path), "--image-size", "8"))
    assert len(held_out) == 60 and len(data) == 540                # a tenth
    assert not set(data.files) & set(held_out.files) and {y for _, y in held_out.files} == {0, 1}


@pytest.mark.parametrize("router", MOE_ROUTERS)
@pytest.mark.parametrize("mass,target,residual", [("gate", "trajectory", False), ("count", "trajectory", True),
                                                  ("count", "step", False)])
def test_stepwise_backward_gives_the_unrolled_gradient(router, mass, target, residual):
    """One step's graph at a time, the same parameter gradient (1e-5 relative), the same
    DiffMoE thresholds afterwards, the same logged statistics."""
    torch.manual_seed(15)
    unrolled = sm.add_saliency_routers(pretrained_like(sm.DiT(tiny(router))))
    with torch.no_grad():                                       # a trained R_sal, so that it matters
        for layer in unrolled.moe_layers():
            layer.sal_router.fc2.weight.normal_(std=0.5)
    stepwise = deepcopy(unrolled)
    x0, y = batch(8)
    noise = sm.training_noise(unrolled.cfg, 8, T=3, generator=torch.Generator().manual_seed(16))
    kw = dict(lam=0.5, mass=mass, target=target, saliency_mean=torch.rand(unrolled.cfg.num_tokens) if residual else None)
    loss, aux, stats = sm.trajectory_loss(unrolled, unrolled.cfg, x0, y, noise, **kw)
    (loss + aux).backward()
    stats_stepwise = sm.trajectory_backward_stepwise(stepwise, stepwise.cfg, x0, y, noise, **kw)
    for (name, p), q in zip(unrolled.named_parameters(), stepwise.parameters()):
        assert (q.grad - p.grad).norm() <= 1e-5 * p.grad.norm() + 1e-10, name
    for a, b in zip(unrolled.buffers(), stepwise.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(stats_stepwise["fm"], stats["fm"])
    torch.testing.assert_close(stats_stepwise["routing"], stats["routing"])
    torch.testing.assert_close(stats_stepwise["aux"], torch.as_tensor(aux).detach())
    assert torch.equal(stats_stepwise["counts"], stats["counts"])


def test_stepwise_all_reduces_once_per_iteration(tmp_path):
    """Under DDP the stepwise path back-propagates T times but syncs gradients once (no_sync on
    all but the last step): counted with a communication hook, in a 1-process gloo group."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(1)
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])
        model = sm.add_saliency_routers(pretrained_like(sm.DiT(tiny("ec"))))
        ddp = DDP(model)
        ddp.register_comm_hook(None, counting_allreduce)
        x0, y = batch(4)
        sm.trajectory_backward_stepwise(ddp, model.cfg, x0, y, sm.training_noise(model.cfg, 4, T=3), no_sync=ddp.no_sync)
        once = len(calls)
        calls.clear()
        sm.trajectory_backward_stepwise(ddp, model.cfg, x0, y, sm.training_noise(model.cfg, 4, T=3))   # no no_sync
        assert once >= 1 and len(calls) == 3 * once
    finally:
        dist.destroy_process_group()


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
# The sampler and sample.py

class StraightFlow(torch.nn.Module):
    """A stand-in model whose flow is exactly straight towards a target that depends on the
    label: v = (x_t - targets[y]) / t (targets[num_classes] for the null class). Records the
    x0_hat and labels of every call."""

    def __init__(self, targets):
        super().__init__()
        self.targets, self.cfg, self.seen = targets, tiny("ec"), []

    def forward(self, x, t, y, x0_hat=None):
        self.seen.append((x0_hat, y))
        return (x - self.targets[y]) / t.view(-1, 1, 1, 1), 0.0, []


def test_euler_sampler_is_exact_on_a_straight_flow_and_guides_and_carries_x0_hat():
    """Guided, v = v_u + s (v_c - v_u) = (x - (T_u + s (T_c - T_u))) / t: a straight flow to the
    guided target, so the sampler must land on it exactly, and route with it from step 2 on."""
    torch.manual_seed(12)
    targets = torch.rand(11, 3, 8, 8) * 0.6 - 0.3               # classes 0..9 and the null class 10
    noise, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    model = StraightFlow(targets)
    guided = targets[10] + 1.5 * (targets[y] - targets[10])     # (2, 3, 8, 8)
    torch.testing.assert_close(sm.sample(model, noise, y, steps=5, cfg_scale=1.5), guided)
    assert len(model.seen) == 5
    first, y_first = model.seen[0]
    assert torch.equal(first, torch.cat([noise, noise]))        # step 1 routes with x_t = noise
    assert torch.equal(y_first, torch.tensor([1, 2, 10, 10]))   # conditional, then null class
    for x0_hat, _ in model.seen[1:]:                            # x0_hat = x_t - t v_guided
        torch.testing.assert_close(x0_hat, torch.cat([guided, guided]))
    model.seen.clear()
    torch.testing.assert_close(sm.sample(model, noise, y, steps=3, cfg_scale=1.0), targets[y])
    assert model.seen[0][1].shape == (2,)                       # cfg 1.0: one pass, no null half
    far = StraightFlow(targets * 10)                            # not clamped: latents go beyond [-1, 1]
    torch.testing.assert_close(sm.sample(far, noise, y, steps=2, cfg_scale=1.0), targets[y] * 10)


def test_rank_correlation_by_hand_with_ties_and_against_scipy():
    # a = (1, 2, 2, 3) ranks (1, 2.5, 2.5, 4); b = (4, 1, 3, 2) ranks (4, 1, 3, 2). Centered:
    # (-1.5, 0, 0, 1.5) and (1.5, -1.5, 0.5, -0.5): rho = -3 / sqrt(4.5 * 5) = -0.632456
    a, b = torch.tensor([[1, 2, 2, 3]]), torch.tensor([[4.0, 1, 3, 2]])
    assert sm.rank_correlation(a, b).item() == pytest.approx(-3 / math.sqrt(4.5 * 5), abs=1e-6)
    import scipy.stats
    rng = np.random.default_rng(0)
    counts, sal = rng.integers(0, 4, (5, 64)), rng.random((5, 64))   # many ties in the counts
    ours = sm.rank_correlation(torch.tensor(counts), torch.tensor(sal))
    ref = [scipy.stats.spearmanr(c, s).statistic for c, s in zip(counts, sal)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)
    assert sm.rank_correlation(torch.ones(1, 8), torch.rand(1, 8)).item() == 0   # no spread: 0


class SaliencyOracle(torch.nn.Module):
    """A stand-in MoE model: its flow is straight towards the true x0 (so x0_hat = x0 from the
    second step on), and each token gets 1 expert, plus a second one where the saliency of the
    x0_hat it routes with is above that image's mean."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.cfg = x0, tiny("ec")

    def forward(self, x, t, y, x0_hat=None):
        M = sm.laplacian_saliency(x0_hat, self.cfg.patch_size)   # (B, N)
        mask = torch.stack([torch.ones_like(M, dtype=torch.bool), M > M.mean(1, keepdim=True)], -1)
        return (x - self.x0) / t.view(-1, 1, 1, 1), 0.0, [(mask.float() / 2, mask)]


def test_routing_probe_chains_x0_hat_from_0999_and_measures_count_loss_and_position():
    x0, y = batch(8)
    eps = torch.randn(generator=torch.Generator().manual_seed(0), size=x0.shape)
    r = sm.routing_probe(SaliencyOracle(x0), x0, y, eps)
    assert sm.PROBE_T[0] == 0.999 and r["corr"].shape == r["corr_pos"].shape == r["loss"].shape == (len(sm.PROBE_T),)
    M = sm.laplacian_saliency(x0, 4)
    count = 1 + (M > M.mean(1, keepdim=True)).long()
    assert abs(r["corr"][0]) < 0.3                              # step 1 routes with x_t: noise
    torch.testing.assert_close(r["corr"][1:], sm.rank_correlation(count, M).mean().expand(len(sm.PROBE_T) - 1))
    torch.testing.assert_close(r["corr_pos"][1:], sm.position_controlled_correlation(count, M).expand(len(sm.PROBE_T) - 1))
    assert r["loss"].max() < 1e-10                              # the stand-in's v is the true velocity
    assert torch.equal(r["counts"][1], count)


class PositionPrior(torch.nn.Module):
    """A stand-in router that learned only where saliency usually is: 2 experts for the tokens
    whose mean saliency over a set of images is above average, 1 for the others, whatever the input."""

    def __init__(self, images):
        super().__init__()
        prior = sm.laplacian_saliency(images, 4).mean(0)
        self.more, self.cfg = prior > prior.mean(), tiny("ec")

    def forward(self, x, t, y, x0_hat=None):
        mask = torch.stack([torch.ones_like(self.more), self.more], -1).expand(x.shape[0], -1, -1)
        return torch.zeros_like(x), 0.0, [(mask.float() / 2, mask)]


def test_position_control_gives_a_positional_router_no_credit():
    data = train.Shapes(32, 256, start=train.HELD_OUT)          # objects near the centre
    x0 = torch.stack([data[i][0] for i in range(256)])
    r = sm.routing_probe(PositionPrior(x0), x0, torch.zeros(256, dtype=torch.long), torch.randn_like(x0))
    assert (r["corr"] > 0.2).all()                              # raw: looks like routing by saliency
    assert (r["corr_pos"].abs() < 1e-6).all()                   # beyond position: nothing
    M = sm.laplacian_saliency(x0, 4)                            # the literal alternative penalizes it:
    literal = sm.rank_correlation(r["counts"][0], M - M.mean(0)).mean()   # per image, against M minus its mean
    assert -0.16 < literal < -0.1                               # (README: about -0.13)


def test_position_controlled_correlation_by_hand():
    # 2 images, 3 tokens. Saliency ranks (1, 2, 3) and (3, 2, 1); their mean per position is
    # (2, 2, 2), so the residual ranks are (-1, 0, 1) and (1, 0, -1). Counts (1, 1, 2) and
    # (2, 1, 1), centered by their mean 4/3: (-1, -1, 2) / 3 and (2, -1, -1) / 3. The sum of
    # products is (1 + 2 + 2 + 1) / 3 = 2; the norms are sqrt(4) and sqrt(12 / 9): rho = 0.866.
    M = torch.tensor([[0.1, 0.5, 0.9], [0.7, 0.4, 0.2]])
    count = torch.tensor([[1, 1, 2], [2, 1, 1]])
    assert sm.position_controlled_correlation(count, M).item() == pytest.approx(2 / (2 * math.sqrt(12 / 9)), abs=1e-6)
    assert sm.position_controlled_correlation(torch.tensor([[1, 1, 2], [1, 1, 2]]), M).item() == 0   # position only


def test_quintile_table_by_hand():
    import sample
    saliency = torch.tensor([[9., 8, 7, 6, 5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])   # 2 tokens a quintile
    q = saliency.argsort(1).argsort(1) // 2                     # (2, 10): quintile 0..4 of each token
    counts = torch.stack([q, 4 - q, q * 2, q + 1]).float()      # 4 steps, one in each step range
    table = sample.quintile_table(counts, saliency, torch.tensor([0.9, 0.6, 0.3, 0.1]))
    assert table == {"t in (0.75, 1.00]": [0, 1, 2, 3, 4], "t in (0.50, 0.75]": [4, 3, 2, 1, 0],
                     "t in (0.25, 0.50]": [0, 2, 4, 6, 8], "t in (0.00, 0.25]": [1, 2, 3, 4, 5]}
    table = sample.quintile_table(counts[:2], saliency, torch.tensor([0.9, 0.8]))   # two steps averaged
    assert table["t in (0.75, 1.00]"] == [2, 2, 2, 2, 2]


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
    common = ["--ckpt", str(sharp_ckpt), "--steps", "4", "--num-samples", "6", "--batch-size", "4", "--grid", "4"]
    sample.main(sample.parse_args(common + ["--out", str(tmp_path / "a"), "--report", "--report-images", "4"]))
    sample.main(sample.parse_args(common + ["--out", str(tmp_path / "b"), "--grid", "0"]))
    a, b = (tmp_path / "a" / "samples.npz").read_bytes(), (tmp_path / "b" / "samples.npz").read_bytes()
    assert a == b                                               # the same command, the same file
    with np.load(tmp_path / "a" / "samples.npz") as f:
        assert f["arr_0"].shape == (6, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    assert Image.open(tmp_path / "a" / "grid.png").size[0] > 4 * 32
    report = json.load(open(tmp_path / "a" / "report_generated.json"))
    assert len(report["t"]) == len(report["rank_correlation"]) == 4 and report["sharpmoe"]
    assert len(report["count_by_saliency_quintile"]) == 4
    assert all(v == 1.0 for v in report["experts_per_token_per_layer"])   # ec: k = 1 on average
    assert Image.open(tmp_path / "a" / "report_generated.png").size[1] > 4 * 32
    sample.main(sample.parse_args(["--ckpt", str(sharp_ckpt), "--steps", "3", "--grid", "0", "--report",
                                   "--real", "--report-images", "4", "--out", str(tmp_path / "a")]))
    assert json.load(open(tmp_path / "a" / "report_real.json"))["what"] == "real"


def test_sample_py_refuses_bad_input_in_one_line(tmp_path, sharp_ckpt):
    import sample
    (tmp_path / "truncated.pt").write_bytes(sharp_ckpt.read_bytes()[:5000])
    (tmp_path / "a_file").write_text("x")
    base = ["--ckpt", str(sharp_ckpt), "--steps", "2", "--out", str(tmp_path / "out")]
    for args, says in ((["--num-samples", "-1"], "--num-samples -1 must be 0 or more"),
                       (["--grid", "-1"], "--grid -1 must be 0"), (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
                       (["--cfg-scale", "-1"], "--cfg-scale -1.0 must be 0 or more"),
                       (["--out", str(tmp_path / "a_file")], "is a file; pass a folder")):
        with pytest.raises(train.UserError, match=says):
            sample.main(sample.parse_args(base + args))
    with pytest.raises(train.UserError, match="truncated.pt is not a readable train.py checkpoint"):
        sample.main(sample.parse_args(["--ckpt", str(tmp_path / "truncated.pt")]))


def test_sample_py_under_torchrun_matches_one_process(tmp_path, sharp_ckpt):
    args = ["--ckpt", str(sharp_ckpt), "--steps", "3", "--num-samples", "5", "--grid", "0"]
    r = run_sample(*args, "--out", str(tmp_path / "two"), torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_sample(*args, "--out", str(tmp_path / "one")).returncode == 0
    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        assert np.abs(one["arr_0"].astype(int) - two["arr_0"].astype(int)).max() <= 1
        assert np.array_equal(one["arr_1"], two["arr_1"])


# ----------------------------------------------------------------------------------------------
# fid.py

import fid


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
    with pytest.raises(train.UserError, match="corrupt or not the published file"):
        fid.load_inception(str(bad))
    for name, broken, says in (("missing", {k: v for k, v in state.items() if k != "fc.bias"}, "missing weights: fc.bias;"),
                               ("extra", dict(state, **{"AuxLogits.fc.weight": torch.zeros(1)}), "extra: AuxLogits.fc.weight")):
        torch.save(broken, raw)
        named = tmp_path / f"{name}-{hashlib.sha256(raw.read_bytes()).hexdigest()[:8]}.pth"
        raw.rename(named)
        with pytest.raises(train.UserError, match=f"not the FID Inception network .*{says}"):
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
    import sample
    arr = np.random.default_rng(1).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    sample.save_npz(str(tmp_path / "s.npz"), arr_0=arr)
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
    import sample
    sample.save_npz(str(tmp_path / "one.npz"), arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(train.UserError, match="FID needs at least 2"):
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
    import sample
    rng = np.random.default_rng(0)
    sample.save_npz(str(tmp_path / "s.npz"), arr_0=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "labels_only.npz", arr_1=np.arange(3))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    (tmp_path / "not_zip.npz").write_bytes(b"hello")
    for path, role, says in (("labels_only.npz", "samples", "has no arr_0"), ("labels_only.npz", "reference", "has no arr_0"),
                             ("not_zip.npz", "samples", "neither an image folder nor an .npz"),
                             ("stats.npz", "samples", r"it is a reference, and fid.py takes the samples first: python fid.py SAMPLES")):
        with pytest.raises(train.UserError, match=says):
            fid.check_input(str(tmp_path / path), role)
    assert fid.check_input(str(tmp_path / "stats.npz"), "reference") is None and fid.check_input(str(tmp_path / "s.npz"), "samples") == 3
    with pytest.raises(train.UserError, match="different dimensions .2048 and 3."):
        fid.frechet_distance(np.zeros(2048), np.eye(2048), np.zeros(3), np.eye(3))
    (tmp_path / "mixed").mkdir()                                # one behaviour, whatever the batch size
    for i, size in enumerate((8, 8, 8, 9)):
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(tmp_path / "mixed" / f"{i}.png")
    for batch_size in (1, 50):
        with pytest.raises(train.UserError, match=r"differ in size \(8x8 .*0.png, 9x9 .*3.png\)"):
            fid.features(None, str(tmp_path / "mixed"), batch_size, "cpu")


def test_fid_cli_end_to_end_with_random_weights(tmp_path):
    import sample
    torch.manual_seed(0)
    raw = tmp_path / "w.pth"
    torch.save(fid.FIDInception().state_dict(), raw)
    weights = tmp_path / f"w-{hashlib.sha256(raw.read_bytes()).hexdigest()[:8]}.pth"
    raw.rename(weights)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        sample.save_npz(str(tmp_path / f"{name}.npz"), arr_0=rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
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

def test_compare_runs_every_setting_for_every_seed_and_resumes(tmp_path, monkeypatch):
    import compare
    train.main(train_args(tmp_path / "pre", "--router", "ec", "--steps", "2"))
    argv = ["--init", str(tmp_path / "pre" / "last.pt"), "--out", str(tmp_path / "cmp"), "--steps", "1",
            "--trajectory-steps", "2", "--lambdas", "0.01", "--global-batch-size", "8", "--num-workers", "0",
            "--eval-images", "8", "--builtin-size", "64", "--probe-images", "8"]
    results = compare.main(compare.parse_args(argv))
    names = ["pretrained", "control-steps", "control-compute", "dual-only", "paper", "paper-lambda-0.1", "count-trajectory-0.01",
             "count-step-0.01", "count-step-residual-0.01"]
    assert list(results)[:-1] == names and list(results)[-1].startswith("oracle (count-")
    saved = json.load(open(tmp_path / "cmp" / "results.json"))
    assert all(len(saved["per_seed"][n]) == 2 for n in names[1:])            # two seeds each
    assert torch.load(tmp_path / "cmp" / "seed1" / "control-compute" / "last.pt", weights_only=True)["step"] == 2
    table = open(tmp_path / "cmp" / "table.md").read()
    assert table.count("| count-step-residual-0.01 |") == 4                 # three per-step tables + quintiles
    monkeypatch.setattr(train, "main", lambda args: pytest.fail("a finished run was trained again"))
    compare.main(compare.parse_args(argv))
    only = compare.main(compare.parse_args(argv + ["--out", str(tmp_path / "only"), "--pretrained-only"]))
    assert list(only) == ["pretrained"] and only["pretrained"][0]["corr"] == saved["per_seed"]["pretrained"][0]["corr"]


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
    import latents
    lat, labels = np.load(latent_dir / "latents.npy"), np.load(latent_dir / "labels.npy")
    meta = json.load(open(latent_dir / "meta.json"))
    assert lat.shape == (20, 2, 4, 16, 16) and lat.dtype == np.float16 and labels.tolist() == [0] * 10 + [1] * 10
    assert meta == dict(vae=tiny_vae, scale=0.18215, image_size=32, latent_size=16, channels=4, count=20,
                        classes=["cat", "dog"])
    vae, x = latents.load_vae(tiny_vae), train.ImageFolder(image_folder, 32)[13][0][None]   # center-cropped
    with torch.no_grad():                                       # posterior mean x 0.18215, image then mirror
        z = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.mean * 0.18215
        np.testing.assert_allclose(lat[13].astype(np.float32), z.numpy(), rtol=2e-3, atol=2e-3)
        assert not np.allclose(lat[13, 0], lat[13, 1], atol=1e-2)   # the mirror is not the image
        torch.testing.assert_close(latents.decode(vae, latents.encode(vae, x)),   # decode undoes the scaling
                                   vae.decode(vae.encode(x).latent_dist.mean).sample)
    pairs, single = train.LatentFolder(str(latent_dir)), train.LatentFolder(str(latent_dir), pairs=False)
    assert torch.equal(pairs[13][0], torch.from_numpy(lat[13].astype(np.float32))) and pairs[13][1] == 1
    assert torch.equal(single[13][0], torch.from_numpy(lat[13, 0].astype(np.float32)))
    views = torch.from_numpy(lat.astype(np.float32)).flatten(0, 1)   # training sees both: the residual baseline
    torch.testing.assert_close(train.position_saliency(pairs, 2, batch=8), sm.laplacian_saliency(views, 2).mean(0))


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
    latents.main(latents.parse_args([image_folder, out, "--reference", "--image-size", "24", "--batch-size", "3",
                                     "--num-workers", "0"]))
    assert fid.check_input(out, "reference") == 20               # what fid.py takes, no VAE involved
    with np.load(out) as f:
        crop = np.asarray(train.center_crop(Image.open(f"{image_folder}/dog/3.png").convert("RGB"), 24))
        assert f["arr_0"].shape == (20, 24, 24, 3) and np.array_equal(f["arr_0"][13], crop)
        assert f["labels"].tolist() == [0] * 10 + [1] * 10
    with pytest.raises(train.UserError, match="--reference writes an .npz file"):
        latents.parse_args([image_folder, str(tmp_path / "ref"), "--reference"])


def test_flips_mirror_pixels_and_pick_the_mirror_latents():
    x, flip = torch.randn(3, 3, 4, 4), torch.tensor([True, False, True])
    assert torch.equal(train.apply_flip(x, flip), torch.stack([x[0].flip(-1), x[1], x[2].flip(-1)]))
    pairs = torch.randn(3, 2, 4, 2, 2)                          # (B, [image, mirror], C, s, s)
    assert torch.equal(train.apply_flip(pairs, flip), torch.stack([pairs[0, 1], pairs[1, 0], pairs[2, 1]]))


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
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "post" / "last.pt"), "--steps", "2", "--grid", "2",
                                   "--num-samples", "3", "--report", "--real", "--report-images", "2", "--out", str(out)]))
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 32, 32, 3) and f["arr_0"].dtype == np.uint8   # decoded to pixels
    report = json.load(open(out / "report_real.json"))
    assert report["images"] == 2 and Image.open(out / "report_real.png").size[1] > 2 * 128
    import latents                                              # its first tile: the held-out image, decoded
    first = np.asarray(Image.open(out / "report_real.png").convert("RGB"))[24:24 + 128:4, 4:4 + 128:4]
    held_out = train.make_datasets(train.parse_args(["--data", str(latent_dir)]))[1]
    decoded = sample.to_uint8(latents.decode(latents.load_vae(tiny_vae), held_out[0][0][None]))[0]
    assert np.abs(first.astype(int) - decoded).max() <= 1


def test_broken_latent_folders_and_missing_diffusers_get_one_line(tmp_path, latent_dir, monkeypatch):
    import shutil
    import latents
    broken = tmp_path / "broken"
    shutil.copytree(latent_dir, broken)
    (broken / "meta.json").unlink()
    with pytest.raises(train.UserError, match="has no meta.json: its extraction did not finish"):
        train.main(train_args(tmp_path / "run", "--data", str(broken)))
    shutil.copy(latent_dir / "meta.json", broken / "meta.json")
    for labels in (np.zeros(7, np.int64), np.full(20, 5)):     # 7 labels for 20 latents; class 5 of 2
        np.save(broken / "labels.npy", labels)
        with pytest.raises(train.UserError, match="the arrays disagree with meta.json"):
            train.main(train_args(tmp_path / "run", "--data", str(broken)))
    monkeypatch.setitem(sys.modules, "diffusers", None)          # as if not installed
    with pytest.raises(train.UserError, match="latent mode needs diffusers: pip install diffusers"):
        latents.load_vae("ema")
    monkeypatch.undo()
    missing = str(tmp_path / "no-such-vae")                      # neither a folder nor a valid Hub id: no network
    with pytest.raises(train.UserError, match=f"cannot load the VAE '{missing}' .* pass --vae /path/to/it"):
        latents.load_vae(missing)
