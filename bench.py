"""
Measurements for README: run `python bench.py` (CPU or GPU; a few minutes on a 2-core CPU).

1. One MoE layer against a dense MLP with the same activated FLOPs (full-width experts, one
   expert per token on average), forward + backward, at two sizes, as time ratios.
2. Training images/s per router for the `cpu` preset (forward, backward, AdamW step).
3. One SharpMoE post-training iteration (T steps of one trajectory) against one ordinary
   training iteration at the same batch, for both backward paths (unrolled: one backward over
   all T steps; stepwise: one step's graph at a time): time (paired ratio) and peak activation
   memory (bytes autograd holds for backward; on a GPU also the peak allocated memory).
4. For the L preset on the paper's latent grid: activation bytes per image, measured, and the
   per-GPU batch that T = 10 leaves in 80 GB for each path (an estimate).
5. On a CPU, a profile of one MoE layer (forward + backward) by part, against the dense MLP.
6. An estimate of the latent ImageNet recipe's GPU-hours per stage, from counted FLOPs and an
   assumed throughput (needs diffusers for the VAE's architecture; nothing is downloaded).
"""
import argparse
import time
from copy import deepcopy

import torch

import sharpmoe as sm
from common import HelpFormatter


def timeit(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]                      # median


def paired_ratio(fn, ref, reps):
    """Median of fn-time / ref-time over alternating runs: robust to a noisy machine."""
    fn(), ref()                                                # warm up
    return sorted(timeit(fn, 1, 0) / timeit(ref, 1, 0) for _ in range(reps))[reps // 2]


def layer_ratios(device, reps):
    print("\n1. MoE layer / dense MLP, forward + backward (same activated FLOPs; ratio 1.00 = no overhead)")
    print(f"{'width':>6} {'tokens':>7} {'dense ms':>9} " + " ".join(f"{r:>8}" for r in ("tc", "ec", "diffmoe")))
    for width, B, N in ((256, 32, 64), (512, 16, 256)):
        x = torch.randn(B, N, width, device=device, requires_grad=True)
        mlp = sm.MLP(width, 4 * width).to(device)
        dense = lambda: mlp(x).sum().backward()
        ratios = []
        for router in ("tc", "ec", "diffmoe"):
            cfg = sm.Config(width=width, heads=4, router=router, num_experts=8)
            moe = sm.MoE(cfg).to(device).train()
            ratios.append(paired_ratio(lambda: moe(x)[0].sum().backward(), dense, reps))
        print(f"{width:>6} {B * N:>7} {timeit(dense, reps) * 1e3:>9.2f} " + " ".join(f"{r:>8.2f}" for r in ratios))


def train_step(model, cfg, x, y, opt, T=1, stepwise=False):
    """One training iteration with fresh draws: ordinary (T = 1) or SharpMoE with the paper's loss."""
    opt.zero_grad(set_to_none=True)
    opts = sm.SharpMoELoss() if T > 1 else None
    sm.forward_backward(model, cfg, x, y, sm.draw_training(cfg, x.shape[0], T, device=x.device), opts, stepwise)
    opt.step()


def forward_backward(model, cfg, x, y, T=1, stepwise=False):
    """The same without the optimizer step (for the memory count)."""
    opts = sm.SharpMoELoss() if T > 1 else None
    sm.forward_backward(model, cfg, x, y, sm.draw_training(cfg, x.shape[0], T, device=x.device), opts, stepwise)


def throughput(device, batch, reps):
    print(f"\n2. Training throughput, preset cpu (32x32, 64 tokens), batch {batch}")
    print(f"{'router':>8} {'params':>8} {'img/s':>8}")
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    for router in sm.ROUTERS:
        cfg = sm.make_config("cpu", router=router, num_classes=10)
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


def post_training_cost(device, batch, reps):
    print(f"\n3. One SharpMoE post-training iteration over one ordinary iteration, both backward paths (the same "
          f"gradient), preset cpu, ec router, batch {batch}; memory: peak bytes held for backward")
    print(f"{'T':>3} {'ordinary ms':>12} {'act. MB':>8} {'unrolled time x':>16} {'stepwise time x':>16} "
          f"{'unrolled mem x':>15} {'stepwise mem x':>15}")
    base_cfg = sm.make_config("cpu", router="ec", num_classes=10)
    base_model = sm.DiT(base_cfg).to(device)
    model = sm.add_saliency_routers(deepcopy(base_model))
    cfg = model.cfg
    base_opt, opt = torch.optim.AdamW(base_model.parameters(), lr=1e-4), torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    ordinary = lambda: train_step(base_model, base_cfg, x, y, base_opt)
    base = timeit(ordinary, reps)
    base_mem = saved_bytes(lambda: forward_backward(base_model, base_cfg, x, y))
    for T in (4, 10):
        ratios, mems = [], []
        for stepwise in (False, True):
            ratios.append(paired_ratio(lambda: train_step(model, cfg, x, y, opt, T, stepwise), ordinary, max(3, reps // 2)))
            mems.append(saved_bytes(lambda: train_step(model, cfg, x, y, opt, T, stepwise)) / base_mem)
        print(f"{T:>3} {base * 1e3:>12.1f} {base_mem / 2**20:>8.1f} {ratios[0]:>16.2f} {ratios[1]:>16.2f} "
              f"{mems[0]:>15.2f} {mems[1]:>15.2f}")
        if device.type == "cuda":
            for stepwise in (False, True):
                torch.cuda.reset_peak_memory_stats()
                train_step(model, cfg, x, y, opt, T, stepwise)
                print(f"    {'stepwise' if stepwise else 'unrolled'}: GPU peak allocated "
                      f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MB")


# Profiler op names -> the parts of a layer (fwd + bwd). aten::mm is the router when one of its
# operands has num_experts columns or rows, else an expert / MLP matmul (tc's grouped_mm loops it).
PARTS = {"router (linear, softmax)": ("router mm", "aten::_softmax", "aten::_softmax_backward_data"),
         "capacity predictor (diffmoe)": ("aten::silu", "aten::silu_backward", "aten::sigmoid",
                                          "aten::binary_cross_entropy_with_logits", "predictor addmm"),
         "top-k / selection": ("aten::topk", "aten::scatter_", "aten::sort", "aten::nonzero", "aten::argsort"),
         "gather": ("aten::index_select",),
         "expert matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"),
         "expert GELU": ("aten::gelu", "aten::gelu_backward"),
         "gate multiply": ("aten::mul", "aten::gather"),
         "scatter": ("aten::index_add_", "aten::scatter_add_")}


def profile_layer(device, reps=10, width=512, B=16, N=256, E=8):
    """Self CPU time of one layer's forward + backward, by part, in % of that layer's total. (Shares:
    absolute times of separately profiled layers wander with the machine; part 1 gives the ratios.)"""
    from torch.profiler import ProfilerActivity, profile
    print(f"\n5. Profile, forward + backward at width {width}, {B * N} tokens, {E} experts: self CPU time by part, "
          "% of each layer's total")
    x = torch.randn(B, N, width, device=device, requires_grad=True)

    def parts(fn):
        fn()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(reps):
                fn()
        out = dict.fromkeys([*PARTS, "other (copies, fills, sums, grad accumulation)"], 0.0)
        for e in prof.key_averages(group_by_input_shape=True):
            shapes = [d for shape in e.input_shapes if isinstance(shape, list) for d in shape]
            name = e.key
            if name == "aten::mm" and E in shapes:
                name = "router mm"
            elif name == "aten::addmm" and width in shapes and 4 * width not in shapes:
                name = "predictor addmm"                            # DiffMoE's Linear(D, D) and Linear(D, E)
            part = next((p for p, names in PARTS.items() if name in names), "other (copies, fills, sums, grad accumulation)")
            out[part] += e.self_cpu_time_total / reps / 1e3
        return out
    mlp = sm.MLP(width, 4 * width).to(device)
    rows = {"dense": parts(lambda: mlp(x).sum().backward())}
    for router in ("tc", "ec", "diffmoe"):
        moe = sm.MoE(sm.Config(width=width, heads=4, router=router, num_experts=E)).to(device).train()
        rows[router] = parts(lambda: moe(x)[0].sum().backward())
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
    per_image = saved_bytes(lambda: forward_backward(model, cfg, x, y)) / 2
    params = sum(p.numel() for p in model.parameters())
    states = params * 4 * 5                                    # weights, gradients, 2 AdamW moments, EMA
    free = gpu_gb * 2**30 - states
    print(f"    {params / 1e9:.2f}B parameters: {states / 2**30:.1f} GB of fp32 states; "
          f"one ordinary step holds {per_image / 2**20:.0f} MB per image")
    print(f"    per-GPU batch that fits (estimate): ordinary {int(free // per_image)}, "
          f"unrolled {int(free // (per_image * T))}, stepwise {int(free // per_image)}")


def latent_recipe_estimate(tflops=300.0, images=126_689, batch=256, pretrain=100_000, post=20_000, T=10, samples=50_000):
    """GPU-hours of the latent ImageNet recipe (README), an ESTIMATE: FLOPs counted here on the
    meta device for the real architectures (DiT-L EC on 32x32x4 latents; SD's VAE at 256 pixels,
    random weights, nothing downloaded), divided by an assumed sustained throughput."""
    from torch.utils.flop_counter import FlopCounterMode

    def gflops(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9
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
    # about 4 T (part 3 measures it at 1.31-1.36 T ordinary steps); guided sampling 2 per Euler step.
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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (the median is reported)")
    p.add_argument("--batch", type=int, default=32, help="images per step for parts 2 and 3")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    layer_ratios(device, args.reps)
    throughput(device, args.batch, args.reps)
    post_training_cost(device, args.batch, args.reps)
    large_model_estimate(device)
    if device.type == "cpu":
        profile_layer(device)
    latent_recipe_estimate()
