"""
Speed and memory, measured: `python bench.py` (a few minutes on a 2-core CPU; on a GPU it runs the
same parts), and `python bench.py --gpu`, the GPU check (under 8 minutes on one GPU; without a
GPU it says so and exits).

1. One MoE layer against a dense MLP with the same activated FLOPs (full-width experts, one
   expert per token on average), forward + backward as train.py trains it (its default experts:
   8 for tc and ec, 16 for diffmoe; TC's balance loss and DiffMoE's capacity-predictor BCE
   back-propagated; gradients set to None before each), at two sizes, as paired time ratios;
   beside them the experts' batched matmuls alone (8 and 16 experts) and the peers' designs
   (KwaiVGI/DiffMoE's, rewritten from their description: one-hot einsum EC, gather-stack DiffMoE).
2. Training images/s per router for the `cpu` preset (forward, backward, AdamW step).
3. One SharpMoE post-training iteration (T steps of one trajectory) against one ordinary
   iteration at the same batch: unrolled (one backward over all T steps), stepwise with the
   paper's trajectory KL (a no-grad pre-pass, then one step's graph at a time) and stepwise with
   the per-step KL (no pre-pass); time in units of T ordinary iterations against the floor
   (unrolled and per-step KL: 1.0 T; trajectory KL: 1 + 1/3 T, one extra forward per step), and
   peak activation memory (bytes autograd holds for backward; on a GPU the peak allocated).
4. For the L preset on the paper's latent grid: activation bytes per image, measured, and the
   per-GPU batch that T = 10 leaves in 80 GB for each path (an estimate).
5. On a CPU, a profile of one MoE layer as trained (forward + backward) by part, against the
   dense MLP.
6. An estimate of the latent ImageNet recipe's GPU-hours per stage, from counted FLOPs and an
   assumed throughput (needs diffusers for the VAE's architecture; nothing is downloaded).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from copy import deepcopy

import numpy as np
import torch
import torch.nn.functional as F

import sharpmoe as sm
from common import RECIPES, HelpFormatter

HERE = os.path.dirname(os.path.abspath(__file__))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, reps, warmup=2):
    """Median seconds of fn over reps runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def paired_ratio(fn, ref, reps):
    """Median of fn-time / ref-time over alternating runs: robust to a noisy machine."""
    fn(), ref()                                                # warm up
    return sorted(timeit(fn, 1, 0) / timeit(ref, 1, 0) for _ in range(reps))[reps // 2]


# ----------------------------------------------------------------------------------------------
# Part 1: one MoE layer as train.py trains it, and the designs the peers ship (written here from
# their descriptions, not copied): KwaiVGI/DiffMoE's EC-DiT layer dispatches with a one-hot
# (B, E, C, N) einsum and runs the experts in a Python loop; its DiffMoE training layer gathers,
# stacks per-expert outputs, scatters them into an (E * tokens, D) buffer and updates the
# thresholds expert by expert.

def per_expert_weights(experts):
    """Each expert's own (w1, b1, w2, b2) Parameters, copied from sm.Experts' stacked ones, as the
    peers keep one Linear pair per expert (slicing one stacked Parameter in a Python loop would
    charge every expert's backward a zero-filled gradient of all E experts)."""
    return torch.nn.ParameterList([torch.nn.Parameter(p[e].detach().clone()) for e in range(experts.w1.shape[0])
                                   for p in (experts.w1, experts.b1, experts.w2, experts.b2)])


def by_expert(weights):
    """per_expert_weights' list as one (w1, b1, w2, b2) tuple per expert."""
    return [tuple(weights[i:i + 4]) for i in range(0, len(weights), 4)]


class OneHotEC(torch.nn.Module):
    """EC-DiT with one-hot einsum dispatch and combine, the experts in a loop."""

    def __init__(self, moe):
        super().__init__()
        self.moe, self.per_expert = moe, per_expert_weights(moe.experts)

    def forward(self, x):
        B, N, D = x.shape
        m = self.moe
        gates = m.pre_router(x).softmax(-1)                    # (B, N, E)
        C = N * m.k // m.E
        top = gates.topk(C, dim=1)                             # (B, C, E) per expert's top tokens
        onehot = F.one_hot(top.indices.transpose(1, 2), N).to(x.dtype)   # (B, E, C, N)
        xe = torch.einsum("becn,bnd->becd", onehot, x)         # dispatch
        ye = torch.stack([F.gelu(xi @ w1 + b1) @ w2 + b2                      # (B, E, C, D)
                          for (w1, b1, w2, b2), xi in zip(by_expert(self.per_expert), xe.unbind(1))], 1)
        combine = onehot * top.values.transpose(1, 2).unsqueeze(-1)      # (B, E, C, N) gate-weighted
        return torch.einsum("becn,becd->bnd", combine, ye), x.new_zeros(())


class GatherStackDiffMoE(torch.nn.Module):
    """DiffMoE training with per-expert gathers, stacked outputs scattered into an (E * B*N, D)
    buffer, the predictor's BCE, and thresholds updated in a loop over experts."""

    def __init__(self, moe):
        super().__init__()
        self.moe, self.per_expert = moe, per_expert_weights(moe.experts)

    def forward(self, x):
        B, N, D = x.shape
        m = self.moe
        flat = x.reshape(B * N, D)
        gates = m.pre_router(flat).softmax(-1)                 # (B*N, E)
        C = B * N * m.k // m.E
        idx = gates.t().topk(C, dim=1).indices                 # (E, C)
        outs = [F.gelu(flat[idx[e]] @ w1 + b1) @ w2 + b2
                for e, (w1, b1, w2, b2) in enumerate(by_expert(self.per_expert))]
        y = torch.stack(outs) * gates.t().gather(1, idx).unsqueeze(-1)   # (E, C, D)
        buf = flat.new_zeros(m.E * B * N, D)
        rows = (idx + torch.arange(m.E, device=x.device)[:, None] * B * N).flatten()
        buf = buf.index_copy(0, rows, y.flatten(0, 1))
        out = buf.view(m.E, B * N, D).sum(0)
        mask = torch.zeros(m.E, B * N, device=x.device).scatter_(1, idx, 1.0).t()
        logits = m.capacity_predictor(flat.detach())
        with torch.no_grad():
            scores = logits.sigmoid()
            for e in range(m.E):                               # the thresholds, expert by expert
                kth = scores[:, e].topk(C).values[-1]
                m.thresholds[e] = m.decay * m.thresholds[e] + (1 - m.decay) * kth
        return out.view(B, N, D), F.binary_cross_entropy_with_logits(logits, mask)


def fwd_bwd(module, x, g):
    """Forward and backward of one layer as in training: gradients start at None (a benchmark
    that lets them accumulate charges the MoE's E times larger weights an extra add per step), and
    the backward runs from the output and the layer's aux loss (TC's balance loss, DiffMoE's
    capacity-predictor BCE), as train.py back-propagates them."""
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        if isinstance(out, tuple) and out[1].requires_grad:
            torch.autograd.backward([out[0], out[1]], [g, torch.ones_like(out[1])])
        else:
            (out[0] if isinstance(out, tuple) else out).backward(g)
        if isinstance(module, sm.MoE):
            sm.update_thresholds(module)                        # (once per iteration, as forward_backward)
    return run


LAYERS = (("experts", "the experts' batched matmuls alone (8 experts), no routing"),
          ("experts 16", "the same for 16 experts (DiffMoE's): half the rows per matmul"),
          ("tc", "token choice, 8 experts, its balance loss"), ("ec", "expert choice in each image, 8 experts"),
          ("ec one-hot", "the peers' EC layer: one-hot einsum dispatch, experts in a loop"),
          ("diffmoe", "DiffMoE, 16 experts, its capacity predictor's BCE back-propagated"),
          ("diffmoe gather-stack", "the peers' DiffMoE training layer, 16 experts"),
          ("diffmoe 8", "DiffMoE with 8 experts (the rows before this table was made as trained)"))


def layer(name, width, device, dtype):
    """The module of a row of LAYERS at this width, in training mode."""
    router = name.split()[0]
    if router == "experts":
        return sm.Experts(int(name.split()[1]) if " " in name else 8, width, 4 * width).to(device, dtype)
    E = 8 if router != "diffmoe" or name == "diffmoe 8" else 16
    moe = sm.MoE(sm.Config(width=width, heads=4, router=router, num_experts=E)).to(device, dtype).train()
    return {"ec one-hot": OneHotEC, "diffmoe gather-stack": GatherStackDiffMoE}.get(name, lambda m: m)(moe)


def layer_ratios(device, reps, sizes=((256, 32, 64), (512, 16, 256)), dtype=torch.float32, names=None):
    """{(width, row): layer / dense time ratio, forward + backward}, and the dense ms per width."""
    out = {}
    for width, B, N in sizes:
        x = torch.randn(B, N, width, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(B, N, width, device=device, dtype=dtype)
        dense = fwd_bwd(sm.MLP(width, 4 * width).to(device, dtype), x, g)
        out[width, "dense ms"] = timeit(dense, reps) * 1e3
        for name, _ in LAYERS:
            if names and name not in names:
                continue
            module = layer(name, width, device, dtype)
            if name.startswith("experts"):
                xe = x.detach().view(module.w1.shape[0], -1, width).requires_grad_()
                out[width, name] = paired_ratio(fwd_bwd(module, xe, g.view(module.w1.shape[0], -1, width)), dense, reps)
            else:
                out[width, name] = paired_ratio(fwd_bwd(module, x, g), dense, reps)
    return out


def print_layer_ratios(device, reps):
    print("\n1. One MoE layer / a dense MLP of the same activated FLOPs (full-width experts, one expert per token "
          "on average), forward + backward as train.py trains it; ratio 1.00 = no overhead")
    for name, what in LAYERS:
        print(f"    {name:>22}: {what}")
    r = layer_ratios(device, reps)
    print(f"{'width':>6} {'tokens':>7} {'dense ms':>9} " + " ".join(f"{n:>12}" for n, _ in LAYERS))
    for width, tokens in ((256, 2048), (512, 4096)):
        print(f"{width:>6} {tokens:>7} {r[width, 'dense ms']:>9.2f} " + " ".join(f"{r[width, n]:>12.2f}" for n, _ in LAYERS))


def train_step(model, cfg, x, y, opt, T=1, scope=None, stepwise=False, bf16=None):
    """One training iteration with fresh draws: ordinary (T = 1) or SharpMoE with the paper's
    loss (scope "trajectory") or the per-step KL (scope "step"); under bf16 autocast (default: on
    a GPU, as train.py)."""
    opt.zero_grad(set_to_none=True)
    opts = sm.SharpMoEOptions(scope=scope, stepwise=stepwise) if T > 1 else None
    bf16 = x.is_cuda if bf16 is None else bf16
    autocast = lambda: torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16)
    sm.forward_backward(model, cfg, x, y, sm.draw_training(cfg, x.shape[0], T, device=x.device), opts, autocast)
    opt.step()


def ordinary_backward(model, cfg, x, y):
    """One ordinary forward and backward, no optimizer (for the memory count)."""
    sm.forward_backward(model, cfg, x, y, sm.draw_training(cfg, x.shape[0], device=x.device))


CPU_IMAGE = RECIPES["cpu"]["image_size"]                    # the cpu recipe's images (16x16: 64 tokens)


def throughput(device, batch, reps):
    size = CPU_IMAGE
    print(f"\n2. Training throughput, the cpu recipe (preset cpu, {size}x{size}: "
          f"{(size // sm.PRESETS['cpu']['patch_size']) ** 2} tokens), batch {batch}")
    print(f"{'router':>8} {'params':>8} {'img/s':>8}")
    x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 10, (batch,), device=device)
    for router in sm.ROUTERS:
        cfg = sm.make_config("cpu", router=router, num_classes=10, image_size=size)
        model = sm.DiT(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        t = timeit(lambda: train_step(model, cfg, x, y, opt), reps)
        print(f"{router:>8} {sum(p.numel() for p in model.parameters()) / 1e6:>7.2f}M {batch / t:>8.1f}")


def saved_bytes(fn):
    """Peak bytes of the distinct tensors autograd holds for backward while fn runs: the bytes
    saved since the last backward, at their largest (one backward at the end: all of them)."""
    seen, peak = {}, [0]
    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t
    backward = torch.Tensor.backward
    def counting_backward(self, *args, **kwargs):              # a backward frees what was saved
        peak[0] = max(peak[0], sum(seen.values()))
        seen.clear()
        return backward(self, *args, **kwargs)
    torch.Tensor.backward = counting_backward
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        torch.Tensor.backward = backward
    return max(peak[0], sum(seen.values()))


POST_PATHS = (("unrolled", "trajectory", False), ("stepwise, trajectory KL", "trajectory", True),
              ("stepwise, per-step KL", "step", True))


def post_training_cost(device, batch, reps, preset="cpu", Ts=(4, 10), image=(3, CPU_IMAGE), bf16=None):
    """Per T: the ordinary iteration (ms, activation MB) and, per path, time / ordinary and
    memory / ordinary. On a GPU also the peak allocated memory (MB) of each. bf16: train_step's."""
    ch, size = image
    base_cfg = sm.make_config(preset, router="ec", num_classes=10, in_channels=ch, image_size=size)
    base_model = sm.DiT(base_cfg).to(device)
    model = sm.add_saliency_routers(deepcopy(base_model))
    cfg = model.cfg
    base_opt, opt = torch.optim.AdamW(base_model.parameters(), lr=1e-4), torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, ch, size, size, device=device), torch.randint(0, 10, (batch,), device=device)
    ordinary = lambda: train_step(base_model, base_cfg, x, y, base_opt, bf16=bf16)
    rows = {"ordinary ms": timeit(ordinary, reps) * 1e3,
            "ordinary MB": saved_bytes(lambda: ordinary_backward(base_model, base_cfg, x, y)) / 2**20}
    for T in Ts:
        for name, scope, stepwise in POST_PATHS:
            step = lambda: train_step(model, cfg, x, y, opt, T, scope, stepwise, bf16)
            rows[T, name, "time"] = paired_ratio(step, ordinary, max(3, reps // 2))
            rows[T, name, "memory"] = saved_bytes(step) / 2**20 / rows["ordinary MB"]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                step()
                rows[T, name, "peak MB"] = torch.cuda.max_memory_allocated() / 2**20
    return rows


def print_post_training_cost(device, batch, reps):
    print(f"\n3. One SharpMoE post-training iteration over one ordinary iteration (the cpu recipe: preset cpu, "
          f"{CPU_IMAGE}x{CPU_IMAGE}, ec, batch {batch}); "
          "memory: peak bytes held for backward. The floor: 1.00 T, and 1.33 T for the trajectory KL stepwise")
    rows = post_training_cost(device, batch, reps)
    print(f"    ordinary iteration: {rows['ordinary ms']:.1f} ms, {rows['ordinary MB']:.1f} MB of activations")
    print(f"{'T':>3} {'path':>24} {'time x':>8} {'in T':>7} {'memory x':>9}")
    for T in (4, 10):
        for name, _, _ in POST_PATHS:
            time_x = rows[T, name, "time"]
            print(f"{T:>3} {name:>24} {time_x:>8.2f} {time_x / T:>6.2f}T {rows[T, name, 'memory']:>9.2f}"
                  + (f"  GPU peak {rows[T, name, 'peak MB']:.0f} MB" if (T, name, "peak MB") in rows else ""))


# Profiler op names -> the parts of a layer (fwd + bwd). aten::mm is the router when one of its
# operands has num_experts columns or rows, else an expert / MLP matmul.
PARTS = {"router (linear, softmax)": ("router mm", "aten::_softmax", "aten::_softmax_backward_data"),
         "capacity predictor (diffmoe)": ("aten::silu", "aten::silu_backward", "aten::sigmoid",
                                          "aten::binary_cross_entropy_with_logits", "predictor addmm"),
         "top-k / selection": ("aten::topk", "aten::scatter_", "aten::sort", "aten::nonzero", "aten::argsort"),
         "gather": ("aten::index_select",),
         "expert matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
         "expert GELU": ("aten::gelu", "aten::gelu_backward"),
         "gate multiply": ("aten::mul", "aten::gather"),
         "scatter": ("aten::index_add_", "aten::scatter_add_")}


def profile_layer(device, reps=10, width=512, B=16, N=256):
    """Self CPU time of one layer's forward + backward, by part, in % of that layer's total. (Shares:
    absolute times of separately profiled layers wander with the machine; part 1 gives the ratios.)"""
    from torch.profiler import ProfilerActivity, profile
    print(f"\n5. Profile, forward + backward as trained (part 1's rows tc, ec, diffmoe: 8, 8 and 16 experts, the "
          f"aux losses back-propagated) at width {width}, {B * N} tokens: self CPU time by part, % of each layer's total")
    x, g = torch.randn(B, N, width, device=device, requires_grad=True), torch.randn(B, N, width, device=device)

    def parts(fn, E=0):
        fn()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(reps):
                fn()
        out = dict.fromkeys([*PARTS, "other (copies, fills, sums)"], 0.0)
        for e in prof.key_averages(group_by_input_shape=True):
            shapes = [d for shape in e.input_shapes if isinstance(shape, list) for d in shape]
            name = e.key
            if name == "aten::mm" and E in shapes:
                name = "router mm"
            elif name == "aten::addmm" and width in shapes and 4 * width not in shapes:
                name = "predictor addmm"                            # DiffMoE's Linear(D, D) and Linear(D, E)
            part = next((p for p, names in PARTS.items() if name in names), "other (copies, fills, sums)")
            out[part] += e.self_cpu_time_total / reps / 1e3
        return out
    rows = {"dense": parts(fwd_bwd(sm.MLP(width, 4 * width).to(device), x, g))}
    for router in ("tc", "ec", "diffmoe"):
        moe = sm.MoE(sm.Config(width=width, heads=4, router=router)).to(device).train()   # its default experts
        rows[router] = parts(fwd_bwd(moe, x, g), moe.E)
    print(f"{'part':>48} " + " ".join(f"{r:>8}" for r in rows))
    for part in rows["ec"]:
        print(f"{part:>48} " + " ".join(f"{100 * rows[r][part] / sum(rows[r].values()):>7.1f}%" for r in rows))
    print(f"{'total ms':>48} " + " ".join(f"{sum(rows[r].values()):>8.0f}" for r in rows))


def large_model_estimate(device, T=10, gpu_gb=80):
    """The L preset on the paper's 32x32x4 latent grid (256 tokens): bytes held for backward per
    image by one ordinary step, measured (fp32, batch 2); and the per-GPU batch that would leave
    at T = 10 for each path in gpu_gb, an ESTIMATE: (memory - weights, gradients, AdamW and EMA
    in fp32) / (activation bytes per image x T (unrolled) or x 1 (stepwise)), before bf16."""
    print(f"\n4. Estimate for the L preset (ec, 256 tokens, T = {T}) in {gpu_gb} GB: from measured fp32 activations")
    cfg = sm.make_config("L", router="ec", image_size=32, in_channels=4, num_classes=1000)
    model = sm.DiT(cfg).to(device)                             # R_sal would add 0.3% parameters
    x, y = torch.randn(2, 4, 32, 32, device=device), torch.randint(0, 1000, (2,), device=device)
    per_image = saved_bytes(lambda: ordinary_backward(model, cfg, x, y)) / 2
    params = sum(p.numel() for p in model.parameters())
    states = params * 4 * 5                                    # weights, gradients, 2 AdamW moments, EMA
    free = gpu_gb * 2**30 - states
    print(f"    {params / 1e9:.2f}B parameters: {states / 2**30:.1f} GB of fp32 states; "
          f"one ordinary step holds {per_image / 2**20:.0f} MB per image")
    print(f"    per-GPU batch that fits (estimate): ordinary {int(free // per_image)}, "
          f"unrolled {int(free // (per_image * T))}, stepwise {int(free // per_image)}")


def gflops(fn):
    """Forward FLOPs of fn, counted (torch.utils.flop_counter), in GFLOPs."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def latent_recipe_estimate(tflops=300.0, images=126_689, batch=256, pretrain=100_000, post=20_000, T=10, samples=50_000):
    """GPU-hours of the latent ImageNet recipe (README), an ESTIMATE: FLOPs counted here on the
    meta device for the real architectures (DiT-L EC on 32x32x4 latents; SD's VAE at 256 pixels,
    random weights, nothing downloaded), divided by an assumed sustained throughput."""
    with torch.device("meta"):
        model = sm.DiT(sm.make_config("L", router="ec", image_size=32, in_channels=4, num_classes=1000))
        dit = gflops(lambda: model(torch.randn(1, 4, 32, 32), torch.rand(1), torch.zeros(1, dtype=torch.long)))
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            print("\n6. Latent recipe estimate: needs diffusers (pip install -r requirements-test.txt)")
            return
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
        enc = gflops(lambda: vae.encode(torch.randn(1, 3, 256, 256)))
        dec = gflops(lambda: vae.decode(torch.randn(1, 4, 32, 32)))
    hours = lambda gf: gf * 1e9 / (tflops * 1e12) / 3600
    # An ordinary step costs about 3 forwards (forward + backward); a stepwise SharpMoE iteration
    # with the trajectory KL about 4 T (part 3); guided sampling 2 per Euler step.
    stages = [("extract latents (image + mirror)", images * 2 * enc),
              (f"pretrain, {pretrain:,} steps of {batch}", pretrain * batch * 3 * dit),
              (f"SharpMoE, {post:,} steps, T = {T}, stepwise", post * batch * T * 4 * dit),
              (f"control, {post:,} steps", post * batch * 3 * dit),
              (f"control, {post * T:,} steps (same compute)", post * T * batch * 3 * dit),
              (f"sample {samples:,} (250 Euler steps, cfg 1.5) + decode, per checkpoint", samples * (250 * 2 * dit + dec))]
    print(f"\n6. ESTIMATE of the latent recipe in GPU-hours at an assumed {tflops:.0f} TFLOP/s sustained: counted "
          f"GFLOPs per image: DiT-L forward {dit:.0f}, VAE encoder {enc:.0f}, decoder {dec:.0f}")
    for name, gf in stages:
        print(f"{name:>62}: {hours(gf):8.1f} GPU-hours")


# ----------------------------------------------------------------------------------------------
# The GPU check: python bench.py --gpu (every part also runs on the CPU: gpu_check(cpu, quick=True))

# Dense bf16 peak TFLOP/s (tensor cores, no sparsity) for MFU, by compute capability and SM count
# (names mislead: the H100 SXM calls itself "NVIDIA H100 80GB HBM3"); "NVL" in the name where
# the same chip runs at another clock.
PEAK_TFLOPS = [((9, 0), 132, "NVL", 835),     # H100 NVL, H200 NVL
               ((9, 0), 132, "", 989),        # H100 SXM, H200
               ((9, 0), 114, "", 756),        # H100 PCIe
               ((10, 0), 148, "", 2250),      # B200
               ((8, 0), 108, "", 312),        # A100 (SXM and PCIe)
               ((8, 9), 142, "", 362),        # L40S
               ((8, 9), 58, "", 121),         # L4
               ((8, 9), 128, "", 165),        # RTX 4090
               ((8, 6), 72, "", 125),         # A10
               ((8, 6), 80, "", 70),          # A10G
               ((8, 6), 82, "", 71)]          # RTX 3090


def peak_tflops(name, capability, sms):
    """The dense bf16 peak of a GPU (PEAK_TFLOPS), or None if it is not listed."""
    return next((p for cap, n, tag, p in PEAK_TFLOPS if cap == tuple(capability) and n == sms and tag in name), None)


def tiny_trained_like(router, sharpmoe, seed=0):
    """A tiny model with weights as after training (adaLN-Zero opened, R_sal nonzero)."""
    torch.manual_seed(seed)
    model = sm.DiT(sm.make_config("tiny", router=router, num_classes=10))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.normal_(std=0.05)
    if sharpmoe:
        sm.add_saliency_routers(model)
        with torch.no_grad():
            for layer in model.moe_layers():
                layer.sal_router.fc2.weight.normal_(std=0.1)
    return model


def agreement(device, router, sharpmoe, bf16):
    """Relative difference of a tiny model's output v and of one training step's gradients,
    `device` (fp32, or bf16 autocast) against the CPU in fp32, on the same weights and draws."""
    model = tiny_trained_like(router, sharpmoe)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    draw = sm.draw_training(model.cfg, 8, T=3 if sharpmoe else 1, generator=torch.Generator().manual_seed(1))
    opts = sm.SharpMoEOptions(lam=0.1, stepwise=False) if sharpmoe else None
    results = []
    for dev, cast in ((torch.device("cpu"), False), (device, bf16)):
        m = deepcopy(model).to(dev).train()
        d = sm.Draw(*(t.to(dev) for t in draw))
        autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cast)
        with torch.no_grad(), autocast():
            v = m(x.to(dev), d.ts[0], y.to(dev), x0_hat=x.to(dev) if sharpmoe else None)[0].float().cpu()
        sm.forward_backward(m, m.cfg, x.to(dev), y.to(dev), d, opts, autocast=autocast)
        results.append((v, [p.grad.float().cpu() for p in m.parameters() if p.grad is not None]))
    (v0, g0), (v1, g1) = results
    rel = lambda a, b: float((a - b).norm() / (a.norm() + 1e-12))
    return rel(v0, v1), max(rel(a, b) for a, b in zip(g0, g1))


def sampling_agreement(device, router, steps=20):
    """sample.py's default on a GPU (bf16 autocast) against fp32 on the same device: the largest
    pixel difference in [-1, 1] units and the share of uint8 pixels that differ, over 16 samples."""
    model = tiny_trained_like(router, router != "dense").to(device).eval()
    noise, y = torch.randn(16, 3, 32, 32, device=device), torch.arange(16, device=device) % 10
    out = []
    for bf16 in (False, True):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(sm.sample(model, noise, y, steps, 1.5).float().clamp(-1, 1))
    u8 = [((o + 1) * 127.5).round() for o in out]
    return float((out[0] - out[1]).abs().max()), float((u8[0] != u8[1]).float().mean())


def ragged_paths(device, dtype, E=8, D=1024, counts=None, reps=10):
    """Experts.ragged's loop over experts against its F.grouped_mm path on the same weights: the
    relative output difference, and ms of each (forward + backward)."""
    torch.manual_seed(0)
    experts = sm.Experts(E, D, 4 * D).to(device, dtype)
    with torch.no_grad():                                       # biases that differ per expert
        experts.b1.normal_(std=0.1), experts.b2.normal_(std=0.1)
    counts = counts if counts is not None else torch.randint(100, 900, (E,))
    x = torch.randn(int(counts.sum()), D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    run = lambda grouped: experts.ragged(x, counts.to(device), grouped=grouped)
    with torch.no_grad():
        a, b = run(False).float(), run(True).float()
    times = [timeit(lambda: run(grouped).backward(g), reps) * 1e3 for grouped in (False, True)]
    return float((a - b).norm() / a.norm()), times


def train_throughput(device, preset, router, batch=128, reps=10):
    """Training images/s on 32x32x4 latent-shaped inputs under bf16 autocast (as train.py on a
    GPU), and the counted FLOPs per image (3 x the forward's)."""
    cfg = sm.make_config(preset, router=router, image_size=32, in_channels=4, num_classes=1000)
    model = sm.DiT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    x, y = torch.randn(batch, 4, 32, 32, device=device), torch.randint(0, 1000, (batch,), device=device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        opt.zero_grad(set_to_none=True)
        sm.forward_backward(model, cfg, x, y, sm.draw_training(cfg, batch, device=device), autocast=autocast)
        opt.step()
    t = timeit(step, reps)
    return batch / t, 3 * gflops(lambda: model(x[:1], torch.rand(1, device=device), y[:1])) * 1e9


def loader_throughput(images=256, workers=4, size=(500, 375), crop=256):
    """Images/s of train.py's ImageFolder (decode, ADM center crop to `crop`) with `workers`
    DataLoader workers, on synthetic JPEGs of an ImageNet-like size."""
    from PIL import Image
    from data import ImageFolder
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "a"))
        for i in range(images):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                os.path.join(root, "a", f"{i}.jpg"), quality=90)
        loader = torch.utils.data.DataLoader(ImageFolder(root, crop), batch_size=32, num_workers=workers)
        t0 = time.perf_counter()
        n = sum(len(y) for _, y in loader)
        return n / (time.perf_counter() - t0)


def gpu_check(device, quick=False):
    """The GPU check, one table per part (quick: tiny sizes, for the tests on a CPU)."""
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = peak_tflops(name, torch.cuda.get_device_capability(), torch.cuda.get_device_properties(0).multi_processor_count) \
        if on_gpu else None
    reps = 2 if quick else 20
    print(f"GPU check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {time.strftime('%Y-%m-%d')}; "
          f"dense bf16 peak {peak} TFLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # fp32 means fp32 in A
    print("\nA. This device against the CPU in fp32, tiny model (trained-like weights): relative difference of the "
          "output v and of one training step's gradients")
    print(f"{'model':>16} {'fp32 v':>9} {'fp32 grad':>10} {'bf16 v':>9} {'bf16 grad':>10}")
    for router, sharp in [(r, False) for r in sm.ROUTERS] + [("ec", True), ("diffmoe", True)]:
        fp32, bf16 = agreement(device, router, sharp, False), agreement(device, router, sharp, True)
        print(f"{router + (' + SharpMoE' if sharp else ''):>16} {fp32[0]:>9.1e} {fp32[1]:>10.1e} {bf16[0]:>9.1e} "
              f"{bf16[1]:>10.1e}")
    print("    fp32: kernel order only (about 1e-6); bf16: 8 mantissa bits, about 1e-2 for dense, more for the MoE "
          "rows, where a rounding flips a token's selection (an expected difference, not an error)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # as train.py on a GPU
    sizes = ((64, 4, 64),) if quick else ((768, 32, 256), (1024, 32, 256))
    print(f"\nB. Part 1 in bf16: one MoE layer / a dense MLP, forward + backward as trained, {sizes[0][1] * sizes[0][2]} tokens")
    r = layer_ratios(device, reps, sizes=sizes, dtype=torch.bfloat16)
    print(f"{'width':>6} {'dense ms':>9} " + " ".join(f"{n:>12}" for n, _ in LAYERS))
    for width, _, _ in sizes:
        print(f"{width:>6} {r[width, 'dense ms']:>9.2f} " + " ".join(f"{r[width, n]:>12.2f}" for n, _ in LAYERS))
    print("\nC. Training on 32x32x4 latent-shaped inputs, bf16 autocast, batch 128: images/s and MFU "
          "(counted FLOPs x images/s / peak)")
    print(f"{'preset':>6} {'router':>8} {'img/s':>8} {'MFU':>6}")
    for preset in (("tiny",) if quick else ("S", "B")):
        for router in sm.ROUTERS:
            ips, flops = train_throughput(device, preset, router, batch=8 if quick else 128, reps=reps)
            print(f"{preset:>6} {router:>8} {ips:>8.0f} " + (f"{flops * ips / (peak * 1e12):>6.1%}" if peak else "     -"))
    preset, batch = ("tiny", 4) if quick else ("B", 32)
    print(f"\nD. One post-training iteration, preset {preset}, ec, T = 10, batch {batch}, against one ordinary iteration")
    rows = post_training_cost(device, batch, 2 if quick else 5, preset=preset, Ts=(10,), image=(4, 32), bf16=True)
    for path, _, _ in POST_PATHS:
        print(f"{path:>24}: time x {rows[10, path, 'time']:.2f} ({rows[10, path, 'time'] / 10:.2f} T)"
              + (f", peak allocated {rows[10, path, 'peak MB']:.0f} MB" if (10, path, "peak MB") in rows else ""))
    D = 64 if quick else 1024
    print(f"\nE. The ragged path (tc; diffmoe at inference), width {D}, 8 experts: the loop against grouped_mm "
          "(sharpmoe.Experts.ragged uses grouped_mm on a GPU in bf16)")
    for dtype in (torch.float32, torch.bfloat16):
        try:
            diff, (loop_ms, grouped_ms) = ragged_paths(device, dtype, D=D, reps=reps)
            print(f"{str(dtype):>16}: relative difference {diff:.1e}; loop {loop_ms:.2f} ms, grouped_mm {grouped_ms:.2f} ms")
        except RuntimeError as e:                               # a dtype a device's grouped_mm refuses
            print(f"{str(dtype):>16}: grouped_mm failed ({str(e).splitlines()[0][:100]})")
    print("\nF. Sampling, sample.py's default (bf16 autocast on a GPU) against fp32, 16 samples, 20 Euler steps, cfg 1.5")
    for router in sm.ROUTERS:
        diff, share = sampling_agreement(device, router, steps=4 if quick else 20)
        print(f"{router:>16}: largest pixel difference {diff:.1e} (of [-1, 1]); uint8 pixels that differ {share:.1%}")
    crop, workers = (64, 0) if quick else (256, 4)
    print(f"\nG. The data loader: train.py's ImageFolder (JPEG decode, center crop to {crop}), {workers} workers")
    ips = loader_throughput(images=16 if quick else 512, workers=workers, crop=crop)
    print(f"    {ips:.0f} images/s per rank (a pixel-folder run is data-bound where training takes more; latents.py "
          "removes the decode)")
    if quick or not on_gpu:
        return
    print("\nH. torchrun with one rank on this GPU (a one-rank nccl group: DDP and its all-reduce run, nothing "
          "crosses GPUs): train.py (3 steps) and sample.py (4 samples)")
    with tempfile.TemporaryDirectory() as tmp:
        run = lambda *a: subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", *a],
                                        cwd=HERE, capture_output=True, text=True, timeout=300)
        r1 = run("train.py", "--preset", "tiny", "--steps", "3", "--global-batch-size", "8", "--builtin-size", "64",
                 "--log-every", "1", "--probe-images", "8", "--out", f"{tmp}/run")
        r2 = run("sample.py", "--ckpt", f"{tmp}/run/last.pt", "--sample-steps", "4", "--num-samples", "4", "--grid", "0")
        for what, r in (("train.py", r1), ("sample.py", r2)):
            print(f"{what:>16}: {'ok' if r.returncode == 0 else 'FAILED: ' + r.stderr.strip().splitlines()[-1]}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (the median is reported)")
    p.add_argument("--batch", type=int, default=32, help="images per step for parts 2 and 3")
    p.add_argument("--gpu", action="store_true", help="run the GPU check instead")
    args = p.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            print("bench.py --gpu: no GPU here (torch.cuda.is_available() is False); nothing to check")
        else:
            gpu_check(torch.device("cuda"))
        sys.exit(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print_layer_ratios(device, args.reps)
    throughput(device, args.batch, args.reps)
    print_post_training_cost(device, args.batch, args.reps)
    large_model_estimate(device)
    if device.type == "cpu":
        profile_layer(device)
    latent_recipe_estimate()
