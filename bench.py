"""
Measurements for README: run `python bench.py` (CPU or GPU; a few minutes on a 2-core CPU).

1. One MoE layer against a dense MLP with the same activated FLOPs (full-width experts, one
   expert per token on average), forward + backward, at two sizes, as time ratios.
2. Training images/s per router for the `cpu` preset (forward, backward, AdamW step).
3. One SharpMoE post-training iteration (T steps of one trajectory) against one ordinary
   training iteration at the same batch: time (paired ratio) and activation memory (bytes
   autograd saves for backward; on a GPU also the peak allocated memory).
"""
import argparse
import time
from copy import deepcopy

import torch

import sharpmoe as sm


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


def loss_of(model, cfg, x, y, T=1):
    """One ordinary (T = 1) or post-training (T > 1) loss with fresh noise: (loss, aux)."""
    noise = sm.training_noise(cfg, x.shape[0], T, device=x.device)
    if T == 1:
        return sm.flow_loss(model, cfg, x, y, noise)[:2]
    return sm.trajectory_loss(model, cfg, x, y, noise)[:2]


def train_step(model, cfg, x, y, opt, T=1):
    loss, aux = loss_of(model, cfg, x, y, T)
    opt.zero_grad(set_to_none=True)
    (loss + aux).backward()
    opt.step()


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
    """Bytes of the distinct tensors autograd saves for backward while fn runs its forward."""
    seen = {}
    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def post_training_cost(device, batch, reps):
    print(f"\n3. SharpMoE post-training iteration / ordinary iteration, preset cpu, ec router, batch {batch}")
    print(f"{'T':>3} {'ordinary ms':>12} {'post ms':>9} {'time x':>7} {'act. MB':>8} {'post act. MB':>13} {'memory x':>9}")
    base_cfg = sm.make_config("cpu", router="ec", num_classes=10)
    base_model = sm.DiT(base_cfg).to(device)
    model = sm.add_saliency_routers(deepcopy(base_model))
    cfg = model.cfg
    base_opt, opt = torch.optim.AdamW(base_model.parameters(), lr=1e-4), torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    ordinary = lambda: train_step(base_model, base_cfg, x, y, base_opt)
    base = timeit(ordinary, reps)
    base_mem = saved_bytes(lambda: loss_of(base_model, base_cfg, x, y))
    for T in (4, 10):
        post = lambda: train_step(model, cfg, x, y, opt, T)
        ratio = paired_ratio(post, ordinary, max(3, reps // 2))
        mem = saved_bytes(lambda: loss_of(model, cfg, x, y, T))
        print(f"{T:>3} {base * 1e3:>12.1f} {base * ratio * 1e3:>9.1f} {ratio:>7.2f} "
              f"{base_mem / 2**20:>8.1f} {mem / 2**20:>13.1f} {mem / base_mem:>9.2f}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            train_step(model, cfg, x, y, opt, T)
            print(f"    GPU peak allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
