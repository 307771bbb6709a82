"""Tests of the method, sharpmoe.py: CPU only, tiny configs. Run: python -m pytest -q"""
import math
from copy import deepcopy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sharpmoe as sm
from data import HELD_OUT, Shapes, Strokes

MOE_ROUTERS = ("tc", "ec", "diffmoe")


def tiny(router="ec", **kw):
    return sm.make_config("tiny", router=router, num_classes=10, **kw)


def batch(n=4, size=32):
    data = Shapes(size, n=64)
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


def test_ragged_loop_equals_a_grouped_mm_reference_and_takes_gradients_per_expert():
    torch.manual_seed(4)
    experts = sm.Experts(4, 16, 32)
    with torch.no_grad():                                       # biases that differ per expert
        experts.b1.normal_(), experts.b2.normal_()
    counts = torch.tensor([5, 0, 11, 3])                       # an empty expert included
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    offs = counts.cumsum(0).int()
    h = F.gelu(F.grouped_mm(x, experts.w1, offs=offs) + experts.b1.repeat_interleave(counts, 0))
    reference = F.grouped_mm(h, experts.w2, offs=offs) + experts.b2.repeat_interleave(counts, 0)
    out = experts.ragged(x, counts)
    torch.testing.assert_close(out, reference)
    out.pow(2).sum().backward()
    assert experts.w1.grad[1].abs().sum() == 0 and experts.w1.grad[2].abs().sum() > 0   # expert 1 saw no token


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
        sm.update_thresholds(moe)                               # once per iteration, as training does
    with torch.no_grad():
        scores = moe.capacity_predictor(x.reshape(-1, cfg.width)).sigmoid()   # (B*N, E)
    C = 2 * cfg.num_tokens // cfg.num_experts
    kth = scores.sort(dim=0, descending=True).values[C - 1]    # (E,)
    torch.testing.assert_close(moe.thresholds, (1 - 0.9 ** 5) * kth)


def test_diffmoe_thresholds_pool_the_t_steps_of_a_trajectory_once_per_iteration():
    """A SharpMoE iteration (T = 4 forwards, one noise level each) moves the thresholds once, by
    the (T-1)*C-th highest score of steps 2..T together: a stratified sample of the uniform t
    that pretraining's pools mix. (Once per forward, each pool holds one t-bin: they drift.)"""
    torch.manual_seed(0)
    model = pretrained_like(sm.add_saliency_routers(sm.DiT(tiny("diffmoe", threshold_decay=0.9))))
    x, y = batch(4)
    draw = sm.draw_training(model.cfg, 4, T=4)
    layer = model.moe_layers()[0]
    inputs = []
    hook = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().flatten(0, 1)))
    sm.forward_backward(model, model.cfg, x, y, draw, sm.SharpMoEOptions(lam=0.0, stepwise=False))
    hook.remove()
    assert len(inputs) == 4 and not layer.pool_scores           # consumed
    with torch.no_grad():
        scores = layer.capacity_predictor(torch.cat(inputs[1:])).sigmoid()   # ((T-1)*B*N, E)
    C = 3 * 4 * model.cfg.num_tokens // model.cfg.num_experts
    torch.testing.assert_close(layer.thresholds, 0.1 * scores.sort(0, descending=True).values[C - 1])


def test_fit_thresholds_give_each_expert_its_capacity_from_the_model_own_predictor():
    """fit_thresholds (the EMA's thresholds): in eval mode, on the very pool it was fitted on, the
    first MoE layer (whose input does not depend on routing) gives each expert the C - 1 tokens
    scored above its C-th: about top_k experts per token; the thresholds of another model's
    predictor do not."""
    torch.manual_seed(0)
    model = pretrained_like(sm.DiT(tiny("diffmoe", depth=2, moe_every=1)))
    other = pretrained_like(deepcopy(model), seed=1)
    with torch.no_grad():
        for p in other.moe_layers()[0].capacity_predictor.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x, y = batch(8)
    draw = sm.draw_training(model.cfg, 8, T=1, generator=torch.Generator().manual_seed(0))
    sm.fit_thresholds(other, x, y, draw)
    model.moe_layers()[0].thresholds.copy_(other.moe_layers()[0].thresholds)   # not its own
    C = 8 * model.cfg.num_tokens // model.cfg.num_experts
    xt, yd = sm.interpolate(x, draw.eps, draw.ts[0]), sm.drop_labels(y, draw.drop, 10)
    per_expert = lambda m: m.eval()(xt, draw.ts[0], yd)[2][0][1].sum((0, 1))   # first layer's (E,)
    with torch.no_grad():
        assert not torch.equal(per_expert(model), torch.full((model.cfg.num_experts,), C - 1))
        sm.fit_thresholds(model, x, y, draw)
        assert torch.equal(per_expert(model), torch.full((model.cfg.num_experts,), C - 1))


def test_balance_loss_by_hand():
    E = 4                                                       # (B, N, E): 2 images of 8 tokens
    uniform = torch.full((2, 8, E), 1 / E)
    mask = torch.eye(E, dtype=torch.bool).repeat(2, 2, 1)       # 2 tokens per expert in each image
    assert sm.balance_loss(uniform, mask).item() == pytest.approx(1.0)
    onto_0 = F.one_hot(torch.zeros(2, 8, dtype=torch.long), E).float()   # every gate and token on expert 0
    assert sm.balance_loss(onto_0, onto_0.bool()).item() == pytest.approx(E)
    mixed = torch.cat([onto_0[:1], uniform[:1]])                # per image, then averaged
    assert sm.balance_loss(mixed, torch.cat([onto_0[:1].bool(), mask[:1]])).item() == pytest.approx((E + 1) / 2)


def expert_shares(alpha, steps=120):
    """A tiny TC-DiT trained `steps` steps with balance_loss alpha: each expert's share of the
    tokens of held-out images at t = 0.5."""
    torch.manual_seed(0)
    cfg = tiny("tc", balance_loss=alpha)
    model = sm.DiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = Strokes(32, 512)
    x, y = torch.stack([data[i][0] for i in range(512)]), torch.tensor([data[i][1] for i in range(512)])
    for _ in range(steps):
        idx = torch.randint(512, (32,))
        sm.forward_backward(model, cfg, x[idx], y[idx], sm.draw_training(cfg, 32))
        opt.step()
        opt.zero_grad()
    t = torch.full((64,), 0.5)
    with torch.no_grad():
        mask = model.eval()(sm.interpolate(x[:64], torch.randn_like(x[:64]), t), t, y[:64])[2][0][1]
    return mask.float().sum((0, 1)) / mask.sum()


def test_token_choice_with_its_balance_loss_keeps_every_expert():
    """Without the balance loss (alpha 0) token choice collapses within 120 steps (an expert under
    1%); with DiffMoE's and DiT-MoE's alpha 0.01, the default, every expert keeps a share."""
    assert sm.Config().balance_loss == 0.01
    assert expert_shares(0.0).min() < 0.01
    assert expert_shares(0.01).min() > 0.04


def test_diffmoe_post_training_keeps_the_control_inference_compute():
    """From one tiny base (200 steps), 40 SharpMoE iterations at lambda 0 (T = 4) and 40 control
    steps route held-out images with about the same inference compute (measured: 0.85 and 0.81
    experts per token per layer; thresholds updated per forward, as before: 1.78, 2.2x)."""
    torch.manual_seed(0)
    data, held = Strokes(32, 512), Strokes(32, 64, start=HELD_OUT)
    x, y = torch.stack([data[i][0] for i in range(512)]), torch.tensor([data[i][1] for i in range(512)])

    def train(model, steps, opts=None, T=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(steps):
            idx = torch.randint(512, (32,), generator=g)
            sm.forward_backward(model, model.cfg, x[idx], y[idx], sm.draw_training(model.cfg, 32, T, g), opts)
            opt.step()
            opt.zero_grad()
        return model

    base = train(sm.DiT(tiny("diffmoe")), 200)
    control = train(deepcopy(base), 40, seed=1)
    post = train(sm.add_saliency_routers(deepcopy(base)), 40, sm.SharpMoEOptions(lam=0.0), T=4, seed=1)
    hx, hy = torch.stack([held[i][0] for i in range(64)]), torch.tensor([held[i][1] for i in range(64)])
    eps = torch.randn(hx.shape, generator=torch.Generator().manual_seed(0))
    compute = [sm.routing_probe(m, hx, hy, eps)["counts"].float().mean().item() for m in (control, post)]
    assert compute[1] == pytest.approx(compute[0], rel=0.15)


def test_guided_diffmoe_routes_each_half_in_its_own_pool():
    """Under CFG, DiffMoE's conditional half routes as it would alone (its dynamic capacity spans
    the batch; one shared pool let the unconditional half change it), and v is the guided one."""
    torch.manual_seed(0)
    model = pretrained_like(sm.DiT(tiny("diffmoe"))).eval()
    for layer in model.moe_layers():
        layer.thresholds.fill_(0.5)
    x, y, t = torch.randn(4, 3, 32, 32), torch.arange(4), torch.full((4,), 0.7)
    with torch.no_grad():
        v, routes = sm.guided_velocity(model, x, t, y, x, 3.0)
        v_c, _, alone = model(x, t, y)
        v_u = model(x, t, torch.full_like(y, 10))[0]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(routes, alone))
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u))


def test_diffmoe_inference_uses_thresholds_and_compute_moves_with_input():
    torch.manual_seed(3)
    cfg = tiny("diffmoe")
    moe = sm.MoE(cfg).eval()
    moe.thresholds.fill_(0.5)
    x = torch.randn(2, cfg.num_tokens, cfg.width)
    with torch.no_grad():
        totals = []
        for scale in (0.2, 1.0, 5.0):
            scores = moe.capacity_predictor(x.reshape(-1, cfg.width) * scale).sigmoid()
            _, _, (_, mask) = moe(x * scale)
            assert torch.equal(mask.sum((0, 1)), (scores > moe.thresholds).sum(0))   # per expert
            totals.append(int(mask.sum()))
    assert len(set(totals)) == 3                                # compute depends on the input


# ----------------------------------------------------------------------------------------------
# The model

@pytest.mark.parametrize("router", sm.ROUTERS)
def test_adaln_zero_every_block_is_the_identity_and_the_output_zero_at_init(router):
    torch.manual_seed(0)
    model = sm.DiT(tiny(router))
    x, y = batch()
    v, _, routes = model(x, torch.rand(4), y)
    assert v.shape == x.shape and v.abs().max() == 0
    assert len(routes) == len(model.moe_layers()) == (0 if router == "dense" else 1)
    h, c = torch.randn(4, model.cfg.num_tokens, model.cfg.width), torch.randn(4, model.cfg.width)
    for block in model.blocks:                                  # whatever the input and condition
        assert torch.equal(block(h, c)[0], h)
    final = model.final_layer                                   # adaLN-Zero in the final layer too
    assert final.adaLN_modulation[-1].weight.abs().max() == 0 and final.linear.weight.abs().max() == 0


def test_loss_falls_on_builtin_data():
    """A toy that must learn: 60 steps on 32 images cut the loss on fixed draws by 30% (at init the
    output is zero, so the loss is the target's own mean square)."""
    torch.manual_seed(0)
    cfg = tiny("ec")
    model = sm.DiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x, y = batch(32)
    fixed = sm.draw_training(cfg, 32, generator=torch.Generator().manual_seed(1))
    before = sm.flow_loss(model, cfg, x, y, fixed)[0].item()
    assert before == pytest.approx(sm.flow_target(x, fixed.eps).pow(2).mean().item())
    for _ in range(60):
        loss, aux, _ = sm.flow_loss(model, cfg, x, y, sm.draw_training(cfg, 32))
        opt.zero_grad(); (loss + aux).backward(); opt.step()
    assert sm.flow_loss(model, cfg, x, y, fixed)[0].item() < 0.7 * before


# ----------------------------------------------------------------------------------------------
# SharpMoE: the dual router, the trajectory, saliency and the routing loss

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
    loss, _, stats = sm.trajectory_loss(rec, cfg, x0, y, sm.draw_training(cfg, 4, T=5), sm.SharpMoEOptions())
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
    see the two tests after this one.)"""
    torch.manual_seed(10)
    base = pretrained_like(sm.DiT(tiny("ec")))
    model = sm.add_saliency_routers(deepcopy(base))
    for name, p in model.named_parameters():
        p.requires_grad_("sal_router" in name)
    x, y = batch(16)
    fixed = sm.draw_training(model.cfg, 16, T=3, generator=torch.Generator().manual_seed(11))

    def routing(m):
        with torch.no_grad():
            return sm.trajectory_loss(m, m.cfg, x, y, fixed, sm.SharpMoEOptions(oracle=True))[2]["routing"].item()

    before = routing(model)
    assert before == routing(base)                              # R_sal starts at zero
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(30):
        draw = sm.draw_training(model.cfg, 16, T=3)
        loss, aux, _ = sm.trajectory_loss(model, model.cfg, x, y, draw, sm.SharpMoEOptions(lam=10.0, oracle=True))
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


def test_routing_scope_step_and_residual_target_by_hand():
    """scope "step" is the mean over steps of KL(softmax(A_k) || softmax(M)); "trajectory" one KL
    on the sum; saliency_mean turns M into M - mean. Checked against the unrolled routes."""
    torch.manual_seed(14)
    model = sm.add_saliency_routers(pretrained_like(sm.DiT(tiny("ec"))))
    x0, y = batch(4)
    draw = sm.draw_training(model.cfg, 4, T=3)
    prior = torch.rand(model.cfg.num_tokens)
    with torch.no_grad():
        y_in = sm.drop_labels(y, draw.drop, model.cfg.num_classes)
        xs = [sm.interpolate(x0, draw.eps, t) for t in draw.ts]
        As = [sm.routed_mass(r, "ec", "count") for *_, r in sm.unroll(model, xs, draw.ts, y_in)]
        M = sm.laplacian_saliency(x0, 4)
        for scope, mean, expected in (("trajectory", None, sm.routing_loss(sum(As), M)),
                                      ("step", None, sum(sm.routing_loss(A, M) for A in As) / 3),
                                      ("step", prior, sum(sm.routing_loss(A, M - prior) for A in As) / 3)):
            opts = sm.SharpMoEOptions(mass="count", scope=scope, saliency_mean=mean)
            torch.testing.assert_close(sm.trajectory_loss(model, model.cfg, x0, y, draw, opts)[2]["routing"], expected)


# ----------------------------------------------------------------------------------------------
# The sampler

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


def test_training_and_sampling_share_one_null_class():
    """CFG: the label training drops to is the one the sampler's unconditional half gets (the
    extra class num_classes; class 0 is a real class)."""
    cfg = tiny("ec")
    dropped = sm.drop_labels(torch.tensor([0, 3, 9]), torch.tensor([True, False, True]), cfg.num_classes)
    assert dropped.tolist() == [10, 3, 10]
    model = StraightFlow(torch.zeros(11, 3, 8, 8))
    sm.sample(model, torch.randn(2, 3, 8, 8), torch.tensor([0, 3]), steps=1, cfg_scale=2.0)
    assert model.seen[0][1].tolist() == [0, 3, 10, 10] and model.cfg.num_classes == 10


def test_every_flow_matching_loss_is_zero_for_the_true_velocity():
    """The target is v = eps - x0 everywhere: a stand-in whose v is the exact velocity of the
    straight path to the true x0, (x_t - x0) / t, has zero loss in one-step training, in each
    step of a trajectory and in the probe (a flipped target would give 4 ||eps - x0||^2 / ...)."""
    x0, y = batch(4)
    model = SaliencyOracle(x0)
    cfg = model.cfg
    draw = sm.draw_training(cfg, 4, generator=torch.Generator().manual_seed(0))
    assert sm.flow_loss(model, cfg, x0, y, draw)[0] < 1e-10
    trajectory = sm.draw_training(cfg, 4, T=4, generator=torch.Generator().manual_seed(0))
    fms = [fm for fm, _, _, _ in sm.trajectory_terms(model, cfg, x0, y, trajectory, sm.SharpMoEOptions())]
    assert len(fms) == 4 and max(fms) < 1e-10
    assert sm.routing_probe(model, x0, y, draw.eps)["loss"].max() < 1e-10
    assert sm.flow_target(x0, draw.eps).equal(draw.eps - x0)


def test_sal_position_decides_whether_r_sal_sees_the_position():
    """R_sal reads x0_hat's patch embedding, plus the position embedding only with sal_position:
    on a flat x0_hat every token's R_sal input is the same without it, and differs with it."""
    x, y = batch(2)
    inputs = {}
    for position in (True, False):
        torch.manual_seed(0)
        model = sm.add_saliency_routers(sm.DiT(tiny("ec")))
        model.cfg.sal_position = position
        layer = model.moe_layers()[0].sal_router
        hook = layer.register_forward_pre_hook(lambda m, a: inputs.__setitem__(position, a[0]))
        model(x, torch.rand(2), y, x0_hat=torch.zeros_like(x))
        hook.remove()
    assert (inputs[False] - inputs[False][:, :1]).abs().max() == 0      # (B, N, D): one row for all tokens
    assert (inputs[True] - inputs[True][:, :1]).abs().max() > 0.1
    torch.testing.assert_close(inputs[True] - inputs[False], model.pos_embed.expand(2, -1, -1))


def test_guided_routes_are_the_conditional_half():
    """guided_velocity returns the routes of the conditional pass (the routes the counts of the
    rollout view are made of), which differ from the unconditional half's."""
    torch.manual_seed(0)
    model = pretrained_like(sm.DiT(tiny("ec"))).eval()
    x, y, t = torch.randn(4, 3, 32, 32), torch.arange(4), torch.full((4,), 0.5)
    with torch.no_grad():
        model.y_embedder.weight.normal_()                       # labels that matter, as after training
        _, routes = sm.guided_velocity(model, x, t, y, x, 4.0)
        conditional = model(x, t, y)[2]
        unconditional = model(x, t, torch.full_like(y, 10))[2]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(routes, conditional))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(routes, unconditional))


def test_rollout_records_the_state_each_step_starts_from():
    """On a straight flow to a target, Euler is exact: the state step k starts from is
    t_k noise + (1 - t_k) target, at the step's own t (the reference view routes these)."""
    targets = torch.rand(11, 3, 8, 8) - 0.5
    noise, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    x, ts, counts, states = sm.rollout_routing(StraightFlow(targets), noise, y, steps=4, cfg_scale=1.0)
    assert counts is None and ts.tolist() == [1.0, 0.75, 0.5, 0.25]
    for t, state in zip(ts, states):
        torch.testing.assert_close(state, t * noise + (1 - t) * targets[y])
    torch.testing.assert_close(x, targets[y])


# ----------------------------------------------------------------------------------------------
# Measuring routing

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
        M = sm.laplacian_saliency(x if x0_hat is None else x0_hat, self.cfg.patch_size)   # (B, N)
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
    data = Shapes(32, 256, start=HELD_OUT)                      # objects near the centre
    x0 = torch.stack([data[i][0] for i in range(256)])
    r = sm.routing_probe(PositionPrior(x0), x0, torch.zeros(256, dtype=torch.long), torch.randn_like(x0))
    assert (r["corr"] > 0.2).all()                              # raw: looks like routing by saliency
    assert (r["corr_pos"].abs() < 1e-6).all()                   # beyond position: nothing
    M = sm.laplacian_saliency(x0, 4)                            # the literal alternative penalizes it:
    literal = sm.rank_correlation(r["counts"][0], M - M.mean(0)).mean()   # per image, against M minus its mean
    assert literal < 0                                          # charges it for being positional


def test_position_controlled_correlation_by_hand():
    # 2 images, 3 tokens. Saliency ranks (1, 2, 3) and (3, 2, 1), less their means per position
    # (2, 2, 2) and per image (2) plus the grand mean (2): (-1, 0, 1) and (1, 0, -1). Counts
    # (1, 1, 2) and (2, 1, 2), less their means per position (1.5, 1, 2) and per image (4/3, 5/3),
    # plus the grand mean 3/2: (-1/3, 1/6, 1/6) and (1/3, -1/6, -1/6). The sum of products is
    # 1/3 + 1/6 + 1/3 + 1/6 = 1, the norms 2 and sqrt(1/3): rho = 0.866.
    M = torch.tensor([[0.1, 0.5, 0.9], [0.7, 0.4, 0.2]])
    count = torch.tensor([[1, 1, 2], [2, 1, 2]])
    expected = 1 / (2 * math.sqrt(1 / 3))
    assert sm.position_controlled_correlation(count, M).item() == pytest.approx(expected, abs=1e-6)
    assert sm.position_controlled_correlation(torch.tensor([[1, 1, 2], [1, 1, 2]]), M).item() == 0   # position only
    assert sm.position_controlled_correlation(torch.tensor([[1, 1, 1], [2, 2, 2]]), M).item() == 0   # image only


def test_position_control_is_partial_a_positional_pattern_in_the_counts_costs_nothing():
    """Counts = the saliency beyond position + a * a centre pattern: the same behaviour beyond
    position for every a. A semipartial correlation (position out of the saliency only) fell from
    +0.90 to +0.16 as a grew; the partial one stays, as does a per-image offset (DiffMoE's pool)."""
    g = torch.Generator().manual_seed(0)
    B, side = 256, 8
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    centre = (-((yy - 3.5) ** 2 + (xx - 3.5) ** 2) / 8).exp().flatten()    # (N,)
    M = centre * 2 + torch.rand(B, side * side, generator=g)    # centre-biased saliency
    r = sm.ranks(M)
    beyond = r - r.mean(0)                                      # the rank residual
    scores = [sm.position_controlled_correlation(beyond + a * 20 * centre + 5 * torch.randn(B, 1, generator=g), M)
              for a in (0, 1, 3)]
    torch.testing.assert_close(torch.stack(scores), torch.ones(3))


def test_saliency_quintiles_by_hand():
    saliency = torch.tensor([[9., 8, 7, 6, 5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])   # 2 tokens a quintile
    q = saliency.argsort(1).argsort(1) // 2                     # (2, 10): quintile 0..4 of each token
    for count, expected in ((q, [0, 1, 2, 3, 4]), (4 - q, [4, 3, 2, 1, 0]), (q * 2 + 1, [1, 3, 5, 7, 9])):
        assert sm.saliency_quintiles(count, saliency).tolist() == expected
    count = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 3], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])   # one token of Q1: mean 2, 1
    assert sm.saliency_quintiles(count, saliency).tolist() == [1.5, 1, 1, 1, 1]
    shuffled = torch.tensor([[3., 9, 0, 6, 1, 8, 4, 2, 7, 5]])  # not its own inverse permutation
    assert sm.saliency_quintiles(torch.arange(10)[None], shuffled).tolist() == [3.0, 3.5, 7.5, 5.5, 3.0]   # by hand


# ----------------------------------------------------------------------------------------------
# The same gradient, one step's graph at a time

@pytest.mark.parametrize("router", MOE_ROUTERS)
@pytest.mark.parametrize("mass,scope,residual", [("gate", "trajectory", False), ("count", "trajectory", True),
                                                 ("count", "step", False)])
def test_stepwise_backward_gives_the_unrolled_gradient(router, mass, scope, residual):
    """One step's graph at a time, the same parameter gradient (1e-5 relative), the same
    DiffMoE thresholds afterwards, the same logged statistics."""
    torch.manual_seed(15)
    unrolled = sm.add_saliency_routers(pretrained_like(sm.DiT(tiny(router))))
    with torch.no_grad():                                       # a trained R_sal, so that it matters
        for layer in unrolled.moe_layers():
            layer.sal_router.fc2.weight.normal_(std=0.5)
    stepwise = deepcopy(unrolled)
    x0, y = batch(8)
    draw = sm.draw_training(unrolled.cfg, 8, T=3, generator=torch.Generator().manual_seed(16))
    opts = sm.SharpMoEOptions(lam=0.5, mass=mass, scope=scope,
                           saliency_mean=torch.rand(unrolled.cfg.num_tokens) if residual else None)
    stats = sm.forward_backward(unrolled, unrolled.cfg, x0, y, draw, replace(opts, stepwise=False))
    stats_stepwise = sm.forward_backward(stepwise, stepwise.cfg, x0, y, draw, opts)
    for (name, p), q in zip(unrolled.named_parameters(), stepwise.parameters()):
        assert (q.grad - p.grad).norm() <= 1e-5 * p.grad.norm() + 1e-10, name
    for a, b in zip(unrolled.buffers(), stepwise.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key in ("fm", "routing", "aux"):
        torch.testing.assert_close(stats_stepwise[key], stats[key])
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
        sm.trajectory_backward_stepwise(ddp, model.cfg, x0, y, sm.draw_training(model.cfg, 4, T=3), sm.SharpMoEOptions(),
                                        no_sync=ddp.no_sync)
        once = len(calls)
        calls.clear()
        sm.trajectory_backward_stepwise(ddp, model.cfg, x0, y, sm.draw_training(model.cfg, 4, T=3), sm.SharpMoEOptions())
        assert once >= 1 and len(calls) == 3 * once
    finally:
        dist.destroy_process_group()




# ----------------------------------------------------------------------------------------------
# Precision and the GPU paths, run on the CPU

def test_ragged_loop_and_grouped_mm_paths_agree_in_fp32_and_bf16_with_gradients():
    """Experts.ragged's two paths (the per-expert loop, the CPU's; F.grouped_mm with groups padded
    to 16 rows, a GPU's in bf16): the same outputs and gradients, an empty expert and counts that
    are not multiples of 16 included."""
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 19, 3])
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        experts = sm.Experts(4, 16, 32).to(dtype)
        with torch.no_grad():
            experts.b1.normal_(), experts.b2.normal_()
        x = torch.randn(int(counts.sum()), 16, dtype=dtype)
        g = torch.randn(int(counts.sum()), 16, dtype=dtype)
        results = []
        for grouped in (False, True):
            experts.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            out = experts.ragged(xi, counts, grouped=grouped)
            out.backward(g)
            results.append([out, xi.grad] + [p.grad for p in experts.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol * a.float().abs().max().item())
        assert results[1][2][1].abs().max() == 0                # expert 1 saw no token: no gradient


@pytest.mark.parametrize("router", sm.ROUTERS)
def test_a_training_step_under_bf16_autocast_runs_for_every_router_and_stays_close(router):
    """CPU bf16 autocast (what a GPU run's precision looks like): the step runs (index_add_ of a
    bf16 source into the fp32 output crashed before) and its gradients stay within bf16's
    precision of fp32's; the saliency M is computed in fp32 under it."""
    torch.manual_seed(0)
    base = pretrained_like(sm.DiT(tiny(router)))
    models = [base] if router == "dense" else [base, pretrained_like(sm.add_saliency_routers(deepcopy(base)), 1)]
    x, y = batch(8)
    for model in models:
        opts = sm.SharpMoEOptions(lam=0.1) if model.cfg.sharpmoe else None
        draw = sm.draw_training(model.cfg, 8, 3 if opts else 1, generator=torch.Generator().manual_seed(1))
        grads = []
        for bf16 in (False, True):
            m = deepcopy(model)
            stats = sm.forward_backward(m, m.cfg, x, y, draw, opts,
                                        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16))
            assert torch.isfinite(stats["fm"])
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        assert (grads[0] - grads[1]).norm() / grads[0].norm() < 0.15
    with torch.autocast("cpu", dtype=torch.bfloat16):
        M = sm.laplacian_saliency(x.bfloat16(), 4)
    assert M.dtype == torch.float32
    torch.testing.assert_close(M, sm.laplacian_saliency(x.bfloat16().float(), 4))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float64))
def test_a_diffmoe_model_cast_to_another_dtype_trains_and_moves_its_thresholds(dtype):
    """Module.to(dtype) casts the thresholds buffer; their update keeps its dtype (bf16's lerp_
    refused an fp32 end, and the GPU check died there), and the quantile is taken in fp32 or wider."""
    torch.manual_seed(0)
    model = pretrained_like(sm.DiT(tiny("diffmoe"))).to(dtype)
    x, y = batch(4)
    sm.forward_backward(model, model.cfg, x.to(dtype), y, sm.draw_training(model.cfg, 4))
    th = model.moe_layers()[0].thresholds
    assert th.dtype == dtype and torch.isfinite(th).all() and th.abs().sum() > 0
