"""Tests for sharpmoe.py and train.py: CPU only, tiny configs. Run: python -m pytest -q"""
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


def batch(n=4, size=32, seed=0):
    data = train.Shapes(size, n=64, seed=seed)
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
def test_one_expert_moe_equals_dense_mlp(router):
    torch.manual_seed(0)
    cfg = tiny(router, num_experts=1)
    moe, mlp = sm.MoE(cfg), sm.MLP(cfg.width, int(cfg.width * cfg.mlp_ratio))
    with torch.no_grad():
        mlp.fc1.weight.copy_(moe.experts.w1[0].t()); mlp.fc1.bias.copy_(moe.experts.b1[0])
        mlp.fc2.weight.copy_(moe.experts.w2[0].t()); mlp.fc2.bias.copy_(moe.experts.b2[0])
    x = torch.randn(3, cfg.num_tokens, cfg.width)
    out, _ = moe(x)
    torch.testing.assert_close(out, mlp(x), rtol=1e-5, atol=1e-5)


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
        out, _ = moe(x)
        gates = moe.last["gates"].reshape(B * N, -1)
        scores = moe.capacity_predictor(x.reshape(B * N, D)).sigmoid() if router == "diffmoe" else None
    mask = reference_selection(router, gates, B, cfg.top_k, None if training else moe.thresholds, scores)
    assert torch.equal(moe.last["mask"].reshape(B * N, -1), mask)
    flat, ref = x.reshape(B * N, D), torch.zeros(B * N, D)
    for m in range(B * N):                                     # per token, per selected expert
        for e in mask[m].nonzero().flatten().tolist():
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
def test_capacity_and_top_k_invariants(router):
    torch.manual_seed(2)
    cfg = tiny(router, top_k=2)
    moe = sm.MoE(cfg).train()
    B, N, E = 4, cfg.num_tokens, cfg.num_experts
    moe(torch.randn(B, N, cfg.width))
    mask, count, gates = moe.last["mask"], moe.last["count"], moe.last["gates"]
    torch.testing.assert_close(gates.sum(-1), torch.ones(B, N))
    assert torch.equal(count, mask.sum(-1))
    if router == "tc":
        assert (count == 2).all()                              # every token: exactly k experts
    elif router == "ec":
        assert (mask.sum(1) == N * 2 // E).all()               # every expert, every image: C tokens
    else:
        assert (mask.sum((0, 1)) == B * N * 2 // E).all()      # every expert: C of the pool
    assert count.float().mean() == 2                           # k experts per token on average


def test_diffmoe_inference_uses_thresholds_and_compute_moves_with_input():
    torch.manual_seed(3)
    cfg = tiny("diffmoe")
    moe = sm.MoE(cfg)
    x = torch.randn(2, cfg.num_tokens, cfg.width)
    for _ in range(30):                                        # thresholds follow the C-th score
        moe.train()(x)
    assert (moe.thresholds != 0).all()
    moe.eval()
    with torch.no_grad():
        scores = moe.capacity_predictor(x.reshape(-1, cfg.width)).sigmoid()
        moe(x)
        per_expert = moe.last["mask"].sum((0, 1))
        assert torch.equal(per_expert, (scores > moe.thresholds).sum(0))
        totals = set()
        for scale in (0.2, 1.0, 5.0):
            moe(x * scale)
            totals.add(int(moe.last["count"].sum()))
    assert len(totals) > 1                                     # compute depends on the input


# ----------------------------------------------------------------------------------------------
# The model, training and checkpoints

@pytest.mark.parametrize("router", sm.ROUTERS)
def test_adaln_zero_model_outputs_zero_at_init(router):
    model = sm.DiT(tiny(router))
    x, y = batch()
    v, _ = model(x, torch.rand(4), y)
    assert v.shape == x.shape and v.abs().max() == 0


def test_loss_falls_on_builtin_data():
    torch.manual_seed(0)
    cfg = tiny("ec")
    model = sm.DiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x, y = batch(32)
    losses = []
    for _ in range(60):
        loss, aux = sm.flow_loss(model, cfg, x, y)
        opt.zero_grad(); (loss + aux).backward(); opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def train_args(out, *extra):
    return train.parse_args(["--preset", "tiny", "--steps", "4", "--global-batch-size", "8",
                             "--num-workers", "0", "--log-every", "2", "--ckpt-every", "2",
                             "--builtin-size", "64", "--out", str(out), *extra])


@pytest.mark.parametrize("extra", [("--router", "diffmoe"), ("--init", "PRE", "--trajectory-steps", "3")])
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


@pytest.mark.parametrize("router", sm.ROUTERS)
def test_torchrun_two_processes(tmp_path, router):
    r = run_cli("--preset", "tiny", "--router", router, "--steps", "2", "--global-batch-size", "8",
                "--num-workers", "0", "--log-every", "1", "--builtin-size", "64", "--out", str(tmp_path), torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2


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
    train.main(train_args(tmp_path / "ec", "--router", "ec", "--steps", "1"))
    fails(r"another config \(router: 'ec' != 'tc'", "--router", "tc", "--resume", str(tmp_path / "ec" / "last.pt"))


def test_unreadable_image_names_the_file_in_one_line(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.full((40, 48, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "2.png").write_bytes(b"not a png")
    r = run_cli("--preset", "tiny", "--data", str(tmp_path), "--steps", "2", "--global-batch-size", "8",
                "--num-workers", "1", "--out", str(tmp_path / "run"))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == f"error: cannot read image {tmp_path}/dog/2.png (UnidentifiedImageError); fix or remove it"
    assert "Traceback" not in r.stderr


def test_global_batch_not_divisible_by_world_size(tmp_path):
    r = run_cli("--preset", "tiny", "--global-batch-size", "7", "--steps", "1", "--out", str(tmp_path), torchrun=True)
    assert r.returncode != 0
    assert "error: --global-batch-size 7 is not divisible by the world size 2; use a multiple of 2" in r.stderr
    assert "train.py\", line" not in r.stderr                 # (torchrun prints its own traceback)


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
        v0, _ = base(x, t, y)
        v1, _ = sal(x, t, y, x0_hat=x0_hat)
        assert torch.equal(v0, v1)
    assert sal.cfg.sharpmoe and not base.cfg.sharpmoe


@pytest.mark.parametrize("router", MOE_ROUTERS)
def test_saliency_router_output_layer_gets_gradient(router):
    torch.manual_seed(6)
    model = sm.add_saliency_routers(pretrained_like(sm.DiT(tiny(router))))
    x, y = batch()
    v, _ = model(x, torch.rand(4), y, x0_hat=x)
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
        v, aux = self.module(x, t, y, x0_hat=x0_hat)
        self.calls.append((x, t, x0_hat, v))
        return v, aux


def test_trajectory_chains_detached_x0_hat():
    torch.manual_seed(7)
    cfg = tiny("ec", sharpmoe=True)
    rec = Recorder(pretrained_like(sm.DiT(cfg)))
    x0, y = batch()
    loss, _, stats = sm.trajectory_loss(rec, cfg, x0, y, T=5)
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
    t = sm.trajectory_timesteps(10, 500, "cpu")
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


def test_routing_loss_prefers_saliency_and_reaches_the_router():
    torch.manual_seed(9)
    M = torch.rand(4, 64)
    follow, oppose = sm.routing_loss(M, M), sm.routing_loss(-M, M)
    assert follow < 1e-6 < oppose
    assert sm.routing_loss(M + 0.1 * torch.randn(4, 64), M) < oppose
    model = sm.add_saliency_routers(pretrained_like(sm.DiT(tiny("ec"))))
    x, y = batch()
    model(x, torch.full((4,), 0.5), y, x0_hat=x)
    sm.routing_loss(model.routed_mass(), sm.laplacian_saliency(x, 4)).backward()
    for layer in model.moe_layers():
        assert layer.router.weight.grad.abs().sum() > 0
        assert layer.sal_router.fc2.weight.grad.abs().sum() > 0


def test_post_training_torchrun_two_processes(tmp_path):
    train.main(train_args(tmp_path / "pre", "--router", "diffmoe", "--steps", "2"))
    r = run_cli("--init", str(tmp_path / "pre" / "last.pt"), "--trajectory-steps", "3", "--steps", "2",
                "--global-batch-size", "8", "--num-workers", "0", "--builtin-size", "64",
                "--out", str(tmp_path / "post"), torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "post" / "last.pt", weights_only=True)
    assert ckpt["config"]["sharpmoe"] and any("sal_router" in k for k in ckpt["ema"])
    sm.DiT(sm.Config(**ckpt["config"])).load_state_dict(ckpt["ema"])   # no extra flag to load
