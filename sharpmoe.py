"""
SharpMoE: saliency-harnessing routing for diffusion Mixture-of-Experts, in one file.

Paper: "Focusing on What Matters: Saliency-Harnessing Accurate Routing for Diffusion MoE",
Deng et al., arXiv 2606.26938 (ECCV 2026). No official code exists; this is a reference.

The paper, part by part, and where it lives here (top to bottom):

  DiT-MoE: a DiT whose FFN is an MoE layer in every other block      DiT, Block, MoE, Experts
    TC-DiT: each token takes its top-k experts; a balance loss        token_choice, balance_loss
    EC-DiT: each expert takes its top-C tokens of each image          expert_choice_in_image
    DiffMoE: expert choice over the batch's pool; capacity            expert_choice_in_pool,
      predictor and thresholds for dynamic capacity at inference      MoE.train_capacity_predictor,
                                                                      update_thresholds, threshold_choice
  Part 1, dual router: S = R_pre(h_t) + R_sal(features of x0_hat)     MoE.forward, SaliencyRouter,
                                                                      DiT.forward, add_saliency_routers
  Part 2, recursive trajectory: T steps of one trajectory, x0_hat     trajectory_timesteps, unroll,
    chained (stop-gradient), t_1 = 0.999                              trajectory_terms
  Part 3, trajectory routing loss:
    saliency M = AvgPool_patch(|Laplacian(x0)|)                        laplacian_saliency
    routed mass A_i = sum_l,e 1[i selected by e] gate(i, e), one step  routed_mass
    L_routing = KL(softmax(sum_k A_k) || softmax(M))                  routing_loss, routing_term
    L = L_fm + lambda L_routing over the trajectory                   trajectory_loss (stepwise:
                                                                      trajectory_backward_stepwise)
  One training iteration (what train.py calls)                        forward_backward
  Sampler: Euler, t = 1 -> 0, CFG, x0_hat carried into R_sal          euler_steps, guided_velocity
  The key figure: expert count against saliency per denoising step   routing_probe (noised view),
                                                                      rollout_routing (rollout view),
                                                                      routing_along (reference view)
  Ours: the same gradient with one step's graph in memory             trajectory_backward_stepwise

Conventions (paper): t in [0, 1], t = 1 is pure noise; x_t = (1 - t) x0 + t eps; v = eps - x0;
clean estimate x0_hat = x_t - t v. Symbols: B images of N tokens of width D; E experts; S the
routing logits (B, N, E) and gates = softmax_E(S); mask the selection (B, N, E); C an expert's
capacity; A the routed mass and M the saliency (B, N), as in the paper.

Choices that are ours where the paper gives none:
  - R_sal's input is the model's own patch embedding (+ position embedding, `sal_position`) of
    x0_hat, computed once per forward and shared by all MoE layers; its hidden width is `sal_hidden`.
  - Trajectory timesteps: t_1 = 0.999, then one uniform draw in each of T - 1 equal bins below.
  - Routing loss: A and M are standardized per image (zero mean, unit std) and divided by a
    temperature (`temp`) before the softmax; raw Laplacian magnitudes give an almost uniform
    softmax.
  - Experts use the exact GELU (DiT uses the tanh approximation, several times slower on CPU).
  - DiffMoE's thresholds start at 0 (its capacity predictor, Linear(D, D)-SiLU-Linear(D, E), is
    as in DiffMoE's code). They move once per iteration: in SharpMoE post-training from steps
    2..T of the trajectory together, a pool that mixes noise levels as pretraining's does (per
    forward, as DiffMoE's code, each pool holds one t-bin and they drift; update_thresholds).
    The EMA weights get thresholds fitted to their own predictor (fit_thresholds). Under CFG,
    DiffMoE's two halves route in pools of their own, as DiffMoE samples (guided_velocity).
  - TC's balance loss (alpha 0.01, the peers') is taken per image and averaged, so that it does
    not depend on how many ranks share the batch.
  - Gates are softmax probabilities over experts and are not renormalized after selection.
  - Beside the paper's routing loss (the defaults of SharpMoEOptions), three options: a count-aware
    routed mass (`mass="count"`: under expert choice the paper's gate mass can lower a token's
    expert count when the loss raises its mass; see routed_mass), one KL per step instead of one
    on the trajectory sum (`scope="step"`), and M minus the training data's mean saliency per
    token position (`saliency_mean`).
  - Every iteration's randomness (timesteps, noise, label drops) is drawn up front (draw_training),
    so that train.py can draw it for the global batch: runs do not depend on the number of GPUs.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("dense", "tc", "ec", "diffmoe")


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class Config:
    image_size: int = 32          # input resolution in pixels
    in_channels: int = 3
    patch_size: int = 2
    depth: int = 12
    width: int = 384              # hidden size D
    heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000       # FOOTGUN: label num_classes (one past the last) is the CFG null class
    class_dropout: float = 0.1    # label dropout for classifier-free guidance
    router: str = "ec"            # how tokens and experts are matched, one of ROUTERS
    num_experts: int = 0          # 0: the paper's choice, 16 for diffmoe and 8 for tc / ec
    top_k: int = 1                # experts per token on average (paper: about 1)
    moe_every: int = 2            # an MoE layer in every moe_every-th block (paper: every other)
    threshold_decay: float = 0.95  # DiffMoE: EMA of the per-expert thresholds
    balance_loss: float = 0.01    # TC: alpha of the load-balancing loss (DiffMoE's, DiT-MoE's default)
    sharpmoe: bool = False        # the model has the saliency routers R_sal
    sal_hidden: int = 64          # R_sal hidden width (our choice)
    sal_position: bool = True     # R_sal's input: x0_hat's patch embedding + the position embedding (ours)
    predict: str = "v"            # the network's output: "v" (the paper's, DiT's) or "x", see DiT.velocity

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.predict not in ("v", "x"):
            raise ValueError(f"unknown predict {self.predict!r}; choose v or x")
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not divisible by patch size "
                             f"{self.patch_size}; pick an image size that is a multiple of it")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.num_experts == 0:
            self.num_experts = {"dense": 1, "diffmoe": 16}.get(self.router, 8)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be between 1 and num_experts {self.num_experts}")
        if self.router in ("ec", "diffmoe") and self.num_tokens * self.top_k < self.num_experts:
            raise ValueError(f"{self.num_tokens} tokens per image give {self.router} experts no capacity "
                             f"with {self.num_experts} experts; use fewer experts or more tokens")
        if self.sharpmoe and self.router == "dense":
            raise ValueError("SharpMoE needs a router; the dense model has none")

    @property
    def num_tokens(self):
        return (self.image_size // self.patch_size) ** 2


# Model sizes. S/B/L/XL are DiT's (patch 2, as on 32x32x4 SD-VAE latents); the MoE layout is the
# paper's: full-width experts, MoE in every other block, top_k = 1. The CPU presets are ours.
PRESETS = {
    "S": dict(depth=12, width=384, heads=6, patch_size=2),
    "B": dict(depth=12, width=768, heads=12, patch_size=2),
    "L": dict(depth=24, width=1024, heads=16, patch_size=2),
    "XL": dict(depth=28, width=1152, heads=16, patch_size=2),
    "cpu": dict(depth=6, width=96, heads=4, patch_size=2),    # 16x16 pixels -> 64 tokens
    "tiny": dict(depth=2, width=32, heads=2, patch_size=4),   # unit tests
}


def make_config(preset, **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return Config(**{**PRESETS[preset], **overrides})


def config_diff(a, b):
    """Fields in which two configs differ, as 'name: a != b' strings."""
    return [f"{f.name}: {getattr(a, f.name)!r} != {getattr(b, f.name)!r}"
            for f in fields(Config) if getattr(a, f.name) != getattr(b, f.name)]


# ----------------------------------------------------------------------------------------------
# Small helpers and embedders

def fp32_or_wider(x):
    """x in float32 if it is in a half type (bf16 autocast); float64 stays float64."""
    return x.float() if x.element_size() < 4 else x


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)   # (B, N, D) by (B, D)


def sincos_1d(pos, dim):
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]                   # (N, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed(dim, grid):
    """Fixed 2D sin-cos position embedding, (grid*grid, dim): DiT's / MAE's, with its two halves
    in the other order (here the row's half first; a permutation of the dims, no other change)."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(ys.flatten(), dim // 2), sincos_1d(xs.flatten(), dim // 2)], 1).float()


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of t in [0, 1], scaled by 1000 to match DiT's integer timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000 * t.float()[:, None] * freqs[None]              # (B, half)
    return torch.cat([args.cos(), args.sin()], dim=1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)          # (B, C, H, W) -> (B, N, D)


# ----------------------------------------------------------------------------------------------
# Attention and the dense MLP

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)             # (B, heads, N, D / heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


# ----------------------------------------------------------------------------------------------
# Routers and experts
#
# Every router turns gates (B*N, E), a softmax over experts for each of the batch's B*N tokens,
# into a selection mask (B*N, E). Fixed capacity (ec; diffmoe in training) also gives `slots`:
# the token indices each expert processes ((E, B*C) for ec, C per image; (E, C) for diffmoe's
# batch pool), so that all experts run as one batched matmul. Variable counts (tc; diffmoe at
# inference) sort the (token, expert) pairs by expert (Experts.ragged).

def expert_choice_in_image(gates, B, capacity):
    """EC-DiT: each expert takes its top-`capacity` tokens of each image. gates: (B*N, E)."""
    BN, E = gates.shape
    N = BN // B
    idx = gates.view(B, N, E).topk(capacity, dim=1).indices     # (B, C, E) token of image b
    idx = idx + N * torch.arange(B, device=gates.device).view(B, 1, 1)
    return idx.permute(2, 0, 1).reshape(E, B * capacity)        # (E, B*C) flat token indices


def expert_choice_in_pool(gates, capacity):
    """DiffMoE training: each expert takes its top-`capacity` tokens of the whole batch."""
    return gates.t().topk(capacity, dim=1).indices              # (E, C)


def token_choice(gates, k):
    """TC-DiT: each token takes its top-k experts."""
    top = gates.topk(k, dim=1).indices                          # (B*N, k)
    return torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top, True)


def threshold_choice(gates, cap_scores, thresholds):
    """DiffMoE inference: expert e takes as many tokens as have a capacity-predictor score above
    its threshold, and picks which ones by router gate. cap_scores: (B*N, E) sigmoid probabilities."""
    n = (cap_scores > thresholds).sum(0)                        # (E,) tokens per expert
    order = gates.t().argsort(dim=1, descending=True)           # (E, B*N) tokens by gate
    rank = torch.arange(gates.shape[0], device=gates.device)
    keep = rank[None] < n[:, None]                              # (E, B*N) first n[e] in order
    mask = torch.zeros_like(keep).scatter_(1, order, keep)      # (E, B*N)
    return mask.t()                                             # (B*N, E)


def slots_to_mask(slots, BN):
    mask = torch.zeros(slots.shape[0], BN, dtype=torch.bool, device=slots.device)
    return mask.scatter_(1, slots, True).t()                    # (E, C) -> (B*N, E)


class Experts(nn.Module):
    """E full-width MLPs, stacked so that fixed-capacity dispatch is one batched matmul."""

    def __init__(self, E, dim, hidden):
        super().__init__()
        bound = math.sqrt(6 / (dim + hidden))                   # xavier-uniform, as DiT's Linears
        self.w1 = nn.Parameter(torch.empty(E, dim, hidden).uniform_(-bound, bound))
        self.b1 = nn.Parameter(torch.zeros(E, hidden))
        self.w2 = nn.Parameter(torch.empty(E, hidden, dim).uniform_(-bound, bound))
        self.b2 = nn.Parameter(torch.zeros(E, dim))

    def forward(self, x):                                       # (E, C, D) -> (E, C, D)
        h = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), x, self.w1))
        return torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)

    def ragged(self, x, counts, grouped=None):
        """Variable counts: x (P, D), P (token, expert) pairs sorted by expert, counts (E,) ->
        (P, D). On a CPU one matmul pair per expert (unbind, not self.w1[e]: the backward of
        indexing a parameter would write a zero (E, D, H) gradient per expert; this loop beats
        F.grouped_mm on a CPU by a fifth, bench.py part 5). grouped (default: on a GPU under bf16,
        where torch has a fast grouped kernel and the loop costs a host sync per expert): all
        experts in one F.grouped_mm pair (bench.py --gpu compares the two)."""
        if grouped is None:
            grouped = x.is_cuda and (x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cuda"))
        if grouped:
            return self.grouped(x, counts)
        w1, b1, w2, b2 = (p.unbind(0) for p in (self.w1, self.b1, self.w2, self.b2))
        chunks = x.split(counts.tolist())                       # E chunks of (n_e, D)
        return torch.cat([torch.addmm(b2[e], F.gelu(torch.addmm(b1[e], xe, w1[e])), w2[e])
                          for e, xe in enumerate(chunks)])

    def grouped(self, x, counts, align=16):
        """ragged with F.grouped_mm. Each expert's rows start at a multiple of `align` (zero rows
        pad the groups, as grouped GEMM kernels want aligned groups; they are dropped after).
        grouped_mm is not covered by autocast: the operands are cast to its dtype here."""
        device = x.device.type
        dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        E, P = counts.shape[0], x.shape[0]
        padded = (counts + align - 1) // align * align          # (E,) rows per group
        ends = padded.cumsum(0)
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=P)   # (P,)
        row = (ends - padded)[expert] + torch.arange(P, device=x.device) - (counts.cumsum(0) - counts)[expert]
        rows = torch.repeat_interleave(torch.arange(E, device=x.device), padded)   # expert of each padded row
        xp = x.new_zeros(rows.shape[0], x.shape[1], dtype=dt).index_copy(0, row, x.to(dt))
        offs = ends.to(torch.int32)
        h = F.gelu(F.grouped_mm(xp, self.w1.to(dt), offs=offs) + self.b1.to(dt)[rows])
        return (F.grouped_mm(h, self.w2.to(dt), offs=offs) + self.b2.to(dt)[rows]).index_select(0, row)


class SaliencyRouter(nn.Module):
    """R_sal (SharpMoE part 1, the dual router): a two-layer SiLU MLP on the tokens of x0_hat.
    FOOTGUN: only the OUTPUT layer starts at zero. With both at zero, SiLU(0) = 0 and no gradient
    ever reaches either layer; with the output at zero the model starts exactly as pretrained."""

    def __init__(self, dim, hidden, E):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, E)
        nn.init.xavier_uniform_(self.fc1.weight)                # as DiT's Linears, on both paths
        nn.init.zeros_(self.fc1.bias)                           # (add_saliency_routers, DiT(cfg))
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x0_hat_emb):
        return self.fc2(F.silu(self.fc1(x0_hat_emb)))           # (B, N, D) -> (B, N, E)


class MoE(nn.Module):
    """An MoE FFN: routing logits S = R_pre(h) [+ R_sal(x0_hat_emb)], gates = softmax_E(S), a
    selection by the configured router (tc, ec, diffmoe), and the selected experts' outputs
    weighted by their gates. forward returns out (B, N, D), aux (a scalar: TC's balance loss,
    DiffMoE's capacity-predictor BCE, else 0) and (gates, mask), each (B, N, E): what the routing
    loss and the expert counts are made of."""

    def __init__(self, cfg):
        super().__init__()
        D, E = cfg.width, cfg.num_experts
        self.router, self.E, self.k = cfg.router, E, cfg.top_k
        self.decay, self.balance = cfg.threshold_decay, cfg.balance_loss
        self.pre_router = nn.Linear(D, E, bias=False)           # R_pre
        self.sal_router = SaliencyRouter(D, cfg.sal_hidden, E) if cfg.sharpmoe else None   # R_sal
        self.experts = Experts(E, D, int(D * cfg.mlp_ratio))
        if self.router == "diffmoe":                            # DiffMoE's capacity predictor
            self.capacity_predictor = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, E))
            self.register_buffer("thresholds", torch.zeros(E))
            self.pool_scores = []       # this iteration's predictor scores, for update_thresholds

    def forward(self, x, x0_hat_emb=None):
        B, N, D = x.shape
        S = self.pre_router(x)                                  # (B, N, E)
        if self.sal_router is not None:
            S = S + self.sal_router(x0_hat_emb)                 # S = R_pre(h_t) + R_sal(x0_hat)
        gates = fp32_or_wider(S).softmax(-1).view(B * N, self.E)   # (B*N, E), fp32 under bf16 too
        flat = x.reshape(B * N, D)
        slots, aux = None, x.new_zeros((), dtype=torch.float32)
        if self.router == "ec":
            slots = expert_choice_in_image(gates, B, N * self.k // self.E)
            mask = slots_to_mask(slots, B * N)
        elif self.router == "tc":
            mask = token_choice(gates, self.k)
            aux = self.balance * balance_loss(gates.view(B, N, -1), mask.view(B, N, -1))
        elif self.training:                                     # diffmoe, fixed capacity
            slots = expert_choice_in_pool(gates, B * N * self.k // self.E)
            mask = slots_to_mask(slots, B * N)
            if torch.is_grad_enabled():                         # (not the stepwise pre-pass)
                aux = self.train_capacity_predictor(flat, mask)
        else:                                                   # diffmoe, dynamic capacity
            cap_scores = fp32_or_wider(self.capacity_predictor(flat)).sigmoid()
            mask = threshold_choice(gates, cap_scores, self.thresholds)
        if slots is not None:
            out = self.dispatch_fixed(flat, gates, slots)
        else:
            out = self.dispatch_ragged(flat, gates, mask)
        return out.view(B, N, D), aux, (gates.view(B, N, self.E), mask.view(B, N, self.E))

    def dispatch_fixed(self, flat, gates, slots):
        E, C = slots.shape                                      # (index_select, not flat[slots]:
        x = flat.index_select(0, slots.flatten()).view(E, C, -1)   # its backward is a fast index_add)
        y = self.experts(x)                                     # (E, C, D), one batched matmul
        w = gates.t().gather(1, slots)                          # (E, C) gate of each slot
        out = torch.zeros_like(flat)                            # (index_add_ in the experts' dtype)
        return out.index_add_(0, slots.flatten(), (y * w.unsqueeze(-1)).to(out.dtype).flatten(0, 1))

    def dispatch_ragged(self, flat, gates, mask):
        expert, tok = mask.t().nonzero(as_tuple=True)           # (P,) each, sorted by expert
        counts = mask.sum(0)                                    # (E,) tokens per expert
        y = self.experts.ragged(flat.index_select(0, tok), counts)   # (P, D)
        out = torch.zeros_like(flat)
        return out.index_add_(0, tok, (y * gates[tok, expert].unsqueeze(-1)).to(out.dtype))

    def train_capacity_predictor(self, flat, mask):
        """DiffMoE: the BCE of the capacity predictor (on detached states) against the selection
        mask (B*N, E). Its detached scores are kept for update_thresholds, which the training
        step calls once per iteration (after the T forwards of a SharpMoE trajectory)."""
        cap_logits = self.capacity_predictor(flat.detach())     # (B*N, E)
        cap_logits = fp32_or_wider(cap_logits)
        self.pool_scores.append(cap_logits.detach().sigmoid())
        return F.binary_cross_entropy_with_logits(cap_logits, mask.to(cap_logits.dtype))


def balance_loss(gates, mask):
    """TC-DiT's load-balancing loss, DiffMoE's and DiT-MoE's MoEGate's: E * sum_e f_e P_e, f_e the
    share of the selections that went to expert e, P_e its mean gate; 1 when balanced. Without it
    token choice collapses onto a few experts. gates, mask: (B, N, E). Ours: per image, then
    averaged (DeepSeek's sequence-wise variant), so that a run does not depend on how many ranks
    share the batch."""
    f = mask.float().sum(1) / mask.sum((1, 2)).unsqueeze(-1)   # (B, E) shares of the selections
    return gates.shape[-1] * (f * gates.mean(1)).sum(-1).mean()


def capacity_quantile(scores, k):
    """(E,): each expert's C-th highest score in a pool of scores (P, E), C = P k / E: the score
    above which an expert of capacity C takes its tokens (DiffMoE's threshold statistic)."""
    P, E = scores.shape
    return scores.t().topk(max(1, P * k // E), dim=1).values[:, -1]


@torch.no_grad()
def update_thresholds(model, skip_first=False):
    """DiffMoE's inference thresholds, once per training iteration: each expert's threshold
    tracks by EMA (decay cfg.threshold_decay) the C-th highest capacity-predictor score of the
    iteration's pool, averaged across ranks. The pool is every training forward since the last
    call: one in pretraining (the C-th of B*N); in a SharpMoE iteration the trajectory's steps
    2..T together (skip_first), one uniform draw per bin of [0, 0.999), so that the pool mixes
    noise levels as pretraining's uniform t does (t_1 = 0.999 is a point that uniform t never
    draws; after logit-normal pretraining the mix differs, and compare.py matches compute by
    calibration). Ours: updated per forward, as DiffMoE's code does, each pool would hold one
    t-bin and the thresholds would drift (measured: 2.2x the control's inference compute; with
    step 1 in the pool 1.3x; without it 1.05x). model may be wrapped in DDP."""
    for layer in model.modules():
        if isinstance(layer, MoE) and layer.router == "diffmoe" and layer.pool_scores:
            pool = layer.pool_scores[1:] if skip_first and len(layer.pool_scores) > 1 else layer.pool_scores
            kth = capacity_quantile(torch.cat(pool), layer.k).contiguous()   # (E,) fp32
            layer.pool_scores.clear()
            if dist.is_available() and dist.is_initialized():   # (contiguous: on a strided view
                dist.all_reduce(kth)                            #  the ranks' thresholds drifted)
                kth /= dist.get_world_size()
            layer.thresholds.lerp_(kth.to(layer.thresholds.dtype), 1 - layer.decay)


@torch.no_grad()
def fit_thresholds(model, x0, y, draw, oracle=False):
    """DiffMoE: sets each expert's threshold to what update_thresholds converges to for these
    weights: capacity_quantile of the model's own predictor scores over the pool of x0 (B images,
    labels y) run along `draw` in training mode: a T = 1 draw mixes noise levels as pretraining
    does; a trajectory draw pools steps 2..T as SharpMoE post-training does. For the EMA
    weights (ours): the raw model's thresholds do not fit the EMA's predictor (measured: 12 of 16
    experts per token). oracle: R_sal routes with the true x0. Returns model."""
    layers = [m for m in model.moe_layers() if m.router == "diffmoe"]
    scores = {m: [] for m in layers}
    keep = lambda m, args: scores[m].append(fp32_or_wider(m.capacity_predictor(args[0].flatten(0, 1))).sigmoid())
    hooks = [m.register_forward_pre_hook(keep) for m in layers]   # args[0]: the layer's input (B, N, D)
    mode = model.training
    model.train()                                               # fixed capacity, as in training
    try:
        xs = (interpolate(x0, draw.eps, t) for t in draw.ts)
        for _ in unroll(model, xs, draw.ts, drop_labels(y, draw.drop, model.cfg.num_classes), x0 if oracle else None):
            pass
    finally:
        for h in hooks:
            h.remove()
        model.train(mode)
    first = len(draw.ts) > 1                                    # the pool of update_thresholds
    for m in layers:
        m.thresholds.copy_(capacity_quantile(torch.cat(scores[m][first:]), m.k))
    return model


# ----------------------------------------------------------------------------------------------
# The DiT block, the final layer and the model

class Block(nn.Module):
    """adaLN-Zero DiT block; the FFN is a dense MLP or an MoE layer."""

    def __init__(self, cfg, moe):
        super().__init__()
        D = cfg.width
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.heads)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ffn = MoE(cfg) if moe else MLP(D, int(D * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c, x0_hat_emb=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        h = modulate(self.norm2(x), shift2, scale2)
        if isinstance(self.ffn, MoE):
            h, aux, route = self.ffn(h, x0_hat_emb)
        else:
            h, aux, route = self.ffn(h), 0.0, None
        return x + gate2.unsqueeze(1) * h, aux, route


class FinalLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, cfg.patch_size ** 2 * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, D)   # + 1: the CFG null class
        grid = cfg.image_size // cfg.patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(D, grid)[None], persistent=False)
        moe = lambda i: cfg.router != "dense" and i % cfg.moe_every == cfg.moe_every - 1
        self.blocks = nn.ModuleList(Block(cfg, moe(i)) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier Linears, N(0, 0.02) embeddings, adaLN-Zero (all modulations and
        the output layer at zero, so every block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for m in [*self.blocks, self.final_layer]:
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        for layer in self.moe_layers():
            if layer.sal_router is not None:
                nn.init.zeros_(layer.sal_router.fc2.weight)     # re-zero after the xavier loop
                nn.init.zeros_(layer.sal_router.fc2.bias)

    def moe_layers(self):
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def unpatchify(self, x):
        p, ch = self.cfg.patch_size, self.cfg.in_channels
        B, N, _ = x.shape
        g = int(N ** 0.5)
        x = x.view(B, g, g, p, p, ch)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, ch, g * p, g * p)

    def forward(self, x, t, y, x0_hat=None):
        """x: (B, C, H, W) the noisy input x_t, t: (B,), y: (B,) labels. x0_hat: the clean
        estimate R_sal routes with, required by a SharpMoE model (at the first denoising step,
        pass x_t itself) and ignored by others. Returns v (B, C, H, W); aux, the summed auxiliary
        loss (DiffMoE's capacity-predictor BCE, 0 otherwise); and routes, one (gates, mask) per
        MoE layer, each (B, N, E)."""
        h = self.x_embedder(x) + self.pos_embed                 # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y)             # (B, D)
        x0_hat_emb = None
        if self.cfg.sharpmoe:                                   # once, shared by all MoE layers
            if x0_hat is None:
                raise ValueError("a SharpMoE model routes with x0_hat; pass it (x_t itself at the first step)")
            x0_hat_emb = self.x_embedder(x0_hat)                # (B, N, D)
            if self.cfg.sal_position:
                x0_hat_emb = x0_hat_emb + self.pos_embed
        aux, routes = 0.0, []
        for block in self.blocks:
            h, a, route = block(h, c, x0_hat_emb)
            aux = aux + a
            routes += [route] if route is not None else []
        return self.velocity(self.unpatchify(self.final_layer(h, c)), x, t), aux, routes

    def velocity(self, out, x, t, t_min=0.05):
        """v from the network's output. predict "v": the output is v (the paper's). predict "x"
        (ours, for pixel models at CPU scale): the output is the clean image, and v = (x_t - x) / t,
        t clipped at t_min, as JiT (Li and He, 2025): a narrow network carries a smooth image far
        better than the full-band noise that v holds (measured: pixel samples of noise-like
        patches with "v")."""
        if self.cfg.predict == "v":
            return out
        return (x - out) / t.clamp(min=t_min).view(-1, 1, 1, 1)


def add_saliency_routers(model):
    """Post-training entry point: give every MoE layer a zero-initialized R_sal. The returned
    model computes exactly what `model` computed until R_sal has been trained."""
    if model.cfg.router == "dense":
        raise ValueError("SharpMoE needs a router; the dense model has none")
    model.cfg.sharpmoe = True
    p = next(model.parameters())
    for layer in model.moe_layers():
        layer.sal_router = SaliencyRouter(model.cfg.width, model.cfg.sal_hidden, layer.E).to(p)
    return model


def expert_count(routes):
    """(B, N): how many experts each token received, summed over the MoE layers."""
    return sum(mask.sum(-1) for _, mask in routes)


# ----------------------------------------------------------------------------------------------
# Training: one-step rectified flow (pretraining, the controls)
#
# The training functions take the model's cfg beside the model: under torchrun the model is a
# DDP wrapper, which hides model.cfg.

class Draw(NamedTuple):
    """Everything random in one training iteration, drawn up front (draw_training)."""
    ts: torch.Tensor            # (T, B) timesteps, descending; T = 1 for one-step training
    eps: torch.Tensor           # (B, C, H, W) the noise, shared by all T steps of a trajectory
    drop: torch.Tensor          # (B,) bool: the CFG label drop, one per image

    def rows(self, idx):
        """The draws of some images of the batch (a rank's share)."""
        return Draw(self.ts[:, idx], self.eps[idx], self.drop[idx])


def draw_training(cfg, B, T=1, generator=None, device="cpu", t_sampling="uniform"):
    """The Draw of one iteration for B images: T = 1, one t per image (pretraining, the controls),
    uniform or, t_sampling "logit-normal", sigmoid of a standard normal (SD3's, ours for the CPU
    recipe: more of the training at the middle t where a glyph's shape is decided); T > 1, one
    SharpMoE trajectory per image (trajectory_timesteps)."""
    kw = dict(generator=generator, device=device)
    if T > 1:
        ts = trajectory_timesteps(T, B, **kw)
    elif t_sampling == "logit-normal":
        ts = torch.randn(1, B, **kw).sigmoid()
    else:
        ts = torch.rand(1, B, **kw)
    eps = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, **kw)
    return Draw(ts, eps, torch.rand(B, **kw) < cfg.class_dropout)


def drop_labels(y, drop, num_classes):
    """Classifier-free guidance training: labels where `drop` is set become the null class.
    FOOTGUN: the null class is the extra index num_classes, not 0 (0 is a real class)."""
    return torch.where(drop, torch.full_like(y, num_classes), y)


def interpolate(x0, eps, t):
    t = t.view(-1, 1, 1, 1)
    return ((1 - t) * x0 + t * eps).to(x0.dtype)                # x_t, t = 1 is noise; x0's dtype


def flow_target(x0, eps):
    """The velocity of the straight path from x0 (t = 0) to eps (t = 1): d x_t / dt."""
    return eps - x0


def flow_loss(model, cfg, x0, y, draw):
    """One-step rectified flow: mean ||v_theta(x_t, t, y) - (eps - x0)||^2 for a T = 1 Draw.
    Returns (loss, aux, routes)."""
    t = draw.ts[0]
    v, aux, routes = model(interpolate(x0, draw.eps, t), t, drop_labels(y, draw.drop, cfg.num_classes))
    return F.mse_loss(v.float(), flow_target(x0, draw.eps)), aux, routes


# ----------------------------------------------------------------------------------------------
# SharpMoE part 2: the recursive trajectory

def trajectory_timesteps(T, B, generator=None, device="cpu"):
    """(T, B) descending timesteps: t_1 = 0.999, then one uniform draw in each of T - 1 equal
    bins of [0, 0.999) from the top (our choice; the paper gives only t_1)."""
    t1 = 0.999
    width = t1 / (T - 1)
    top = t1 - width * torch.arange(T - 1, device=device)       # upper edge of each bin
    rest = top[:, None] - width * torch.rand(T - 1, B, generator=generator, device=device)
    return torch.cat([torch.full((1, B), t1, device=device), rest], 0)


def unroll(model, xs, ts, y, oracle_x0=None):
    """Run the model along the states xs[k] (B, C, H, W) at times ts[k] (B,), k = 1..T,
    descending: step k routes with x0_hat_{k-1} = x_{t_{k-1}} - t_{k-1} v_{k-1}, detached
    (stop-gradient); step 1, which has no previous estimate, with x_{t_1} itself. oracle_x0:
    route every step with this true x0 instead (an ablation bound, not SharpMoE). xs may be a
    generator (training builds each x_t only when it is needed). Yields (v, aux, routes)."""
    x0_hat = None
    for xt, t in zip(xs, ts):
        if x0_hat is None:
            x0_hat = xt                                         # step 1
        v, aux, routes = model(xt, t, y, x0_hat=x0_hat if oracle_x0 is None else oracle_x0)
        yield v, aux, routes
        x0_hat = (xt - t.view(-1, 1, 1, 1) * v).detach().to(xt.dtype)   # x0_hat_k = x_t - t v


# ----------------------------------------------------------------------------------------------
# SharpMoE part 3: saliency -> routed mass -> routing loss -> the trajectory loss

def laplacian_saliency(x0, patch_size):
    """M (SharpMoE part 3): |Laplacian(x0)|, channel mean, average-pooled per patch. (B, N).
    Replicate padding, so a flat image has zero saliency everywhere, borders included."""
    B, ch, H, W = x0.shape
    x0 = fp32_or_wider(x0)                                      # in fp32 under bf16 autocast too:
    k = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]], device=x0.device, dtype=x0.dtype)
    with torch.autocast(x0.device.type, enabled=False):        # in bf16 its ranks agreed at 0.82
        x = F.pad(x0.reshape(B * ch, 1, H, W), (1, 1, 1, 1), mode="replicate")
        lap = F.conv2d(x, k.view(1, 1, 3, 3)).abs().view(B, ch, H, W).mean(1, keepdim=True)
        return F.avg_pool2d(lap, patch_size).flatten(1)         # (B, N)


# The candidate pool among which each expert chooses, as dims of (B, N, E): an image's tokens for
# ec, the whole batch's tokens for diffmoe (tc has no per-token count to shape).
POOL_DIMS = {"ec": (1,), "diffmoe": (0, 1)}
SOFT_COUNT_WIDTH = 0.1     # tau as a fraction of the spread of an expert's gates in its pool (ours)


def routed_mass(routes, router, mass="gate"):
    """A for one step, (B, N), summed over MoE layers l and experts e, differentiable through the
    gates. mass="gate", the paper's: A_i = sum 1[token i selected by e] * gates_l(i, e). Under
    expert choice, raising it moves a token's gates onto the experts that already chose it,
    away from all others: it can lower the token's count (shown by the tests
    test_count_mass_gradient_raises_a_count_that_the_gate_mass_gradient_lowers and
    test_gate_mass_can_never_add_an_expert_and_the_count_mass_often_does).
    mass="count", ours: a soft count, A_i = sum sigmoid((gates_l(i, e) - theta) / tau), theta
    the midpoint between the weakest selected and the strongest rejected gate of expert e in its
    pool, tau a fraction of that expert's gate spread (both detached): raising it raises the
    token's gate where the token is near an expert's cut, so it gains experts."""
    if mass == "gate":
        return sum((mask * gates).sum(-1) for gates, mask in routes)
    A = 0.0
    for gates, mask in routes:
        pool = POOL_DIMS[router]
        with torch.no_grad():
            weakest_in = torch.where(mask, gates, torch.inf).amin(pool, keepdim=True)
            strongest_out = torch.where(mask, -torch.inf, gates).amax(pool, keepdim=True)
            theta = (weakest_in + strongest_out) / 2            # (B or 1, 1, E): each expert's cut
            tau = SOFT_COUNT_WIDTH * gates.std(pool, keepdim=True) + 1e-12
        A = A + torch.sigmoid((gates - theta) / tau).sum(-1)
    return A


def standardize(a):
    return (a - a.mean(-1, keepdim=True)) / (a.std(-1, keepdim=True) + 1e-6)


def routing_loss(A, M, temp=1.0):
    """KL(softmax(A) || softmax(M)) over the tokens of each image, averaged over images.
    A, M: (B, N); both standardized per image first (our choice, see the docstring). Which A it
    aligns with M decides what it does to expert counts: see routed_mass."""
    log_p = F.log_softmax(standardize(A) / temp, dim=-1)
    log_q = F.log_softmax(standardize(M) / temp, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@dataclass
class SharpMoEOptions:
    """How a SharpMoE post-training iteration forms and back-propagates its loss. The defaults
    are the paper's; the rest is ours."""
    lam: float = 0.001          # lambda, the weight of L_routing (paper: 0.001)
    temp: float = 1.0           # softmax temperature after standardizing A and M (ours)
    mass: str = "gate"          # A: "gate", the paper's gate mass; "count", our soft count
    scope: str = "trajectory"   # one KL on A summed over the "trajectory" (paper), or one per "step" (ours)
    saliency_mean: Optional[torch.Tensor] = None   # (N,): M minus this, the data's mean per position (ours)
    oracle: bool = False        # R_sal routes with the true x0, not x0_hat (an ablation bound)
    stepwise: bool = True       # backward one step's graph at a time (ours; the same gradient)


def trajectory_terms(model, cfg, x0, y, draw, opts):
    """Parts 2 and 3, one step at a time: unrolls the trajectory of `draw` (T > 1) and yields,
    per step, the flow-matching loss fm_k, the auxiliary loss aux_k, the routed mass A_k (B, N)
    (None for tc, whose counts are all equal) and the expert count (B, N), detached."""
    y = drop_labels(y, draw.drop, cfg.num_classes)
    xs = (interpolate(x0, draw.eps, t) for t in draw.ts)
    for v, aux, routes in unroll(model, xs, draw.ts, y, x0 if opts.oracle else None):
        A = routed_mass(routes, cfg.router, opts.mass).float() if cfg.router != "tc" else None
        yield F.mse_loss(v.float(), flow_target(x0, draw.eps)), aux, A, expert_count(routes).detach()


def saliency_target(x0, cfg, opts):
    """M of the loss, (B, N): the Laplacian saliency, less opts.saliency_mean when given."""
    M = laplacian_saliency(x0, cfg.patch_size)
    return M if opts.saliency_mean is None else M - opts.saliency_mean


def routing_term(As, M, opts):
    """L_routing of a trajectory's routed masses As (T of (B, N)) against M (B, N): one KL on
    their sum (scope "trajectory", the paper's) or the mean of one KL per step ("step", ours)."""
    if opts.scope == "trajectory":
        return routing_loss(sum(As), M, opts.temp)
    return sum(routing_loss(A, M, opts.temp) for A in As) / len(As)


def trajectory_loss(model, cfg, x0, y, draw, opts):
    """SharpMoE post-training: L = L_fm + lambda L_routing, L_fm the mean flow-matching loss over
    the T steps of one trajectory per image (draw: T > 1), L_routing the KL between the routed
    mass and the saliency, on A summed over the trajectory (the paper) or per step, averaged.
    tc is trained with L_fm only. Returns (loss, aux, stats: fm, routing, counts (T, B, N))."""
    T = draw.ts.shape[0]
    fm, aux, As, counts = zip(*trajectory_terms(model, cfg, x0, y, draw, opts))
    L_fm = sum(f / T for f in fm)
    L_routing = L_fm * 0 if As[0] is None else routing_term(As, saliency_target(x0, cfg, opts), opts)
    stats = dict(fm=L_fm.detach(), routing=L_routing.detach(), counts=torch.stack(counts))
    return L_fm + opts.lam * L_routing, sum(a / T for a in aux), stats


def forward_backward(model, cfg, x0, y, draw, opts=None, autocast=nullcontext, no_sync=nullcontext):
    """One training iteration's forward and backward (gradients accumulate in the parameters),
    then DiffMoE's thresholds move once (update_thresholds). model may be wrapped in DDP; cfg is
    its Config (the wrapper hides model.cfg). opts None: one-step rectified flow (pretraining,
    the controls; flow_loss). opts a SharpMoEOptions: L = L_fm + lambda L_routing on a
    trajectory (trajectory_loss), back-propagated at once or, opts.stepwise, one step's graph at
    a time (the same gradient; see the last section). autocast wraps each forward; no_sync
    (DDP's) the backwards that must not all-reduce. Returns detached stats: fm, aux, routing
    (scalars; the loss is fm + lam * routing + aux) and counts (T, B, N), each token's expert
    count per step (None for a dense model)."""
    if opts is None:
        with autocast():
            loss, aux, routes = flow_loss(model, cfg, x0, y, draw)
        (loss + aux).backward()
        stats = dict(fm=loss.detach(), routing=torch.zeros((), device=x0.device), aux=torch.as_tensor(aux, device=x0.device).detach(),
                     counts=expert_count(routes)[None] if routes else None)
    elif opts.stepwise:
        stats = trajectory_backward_stepwise(model, cfg, x0, y, draw, opts, autocast, no_sync)
    else:
        with autocast():
            loss, aux, stats = trajectory_loss(model, cfg, x0, y, draw, opts)
        (loss + aux).backward()
        stats["aux"] = torch.as_tensor(aux, device=x0.device).detach()
    update_thresholds(model, skip_first=opts is not None)
    return stats


# ----------------------------------------------------------------------------------------------
# The sampler: Euler from t = 1 to 0 with classifier-free guidance, x0_hat carried into the router

def guided_velocity(model, x, t, y, x0_hat, cfg_scale):
    """v = v_u + s (v_c - v_u); s = 1 is one conditional pass. Both halves route with the same
    x0_hat (SharpMoE part 1); one batched pass, but two for DiffMoE, whose inference capacity
    depends on the batch. Returns v and the routes of the conditional half.
    FOOTGUN: the unconditional label is the null class num_classes."""
    if cfg_scale == 1.0:
        v, _, routes = model(x, t, y, x0_hat=x0_hat)
        return v, routes
    null = torch.full_like(y, model.cfg.num_classes)
    if model.cfg.router == "diffmoe":                           # its capacity spans the batch: the
        v_c, _, routes = model(x, t, y, x0_hat=x0_hat)          # halves apart, as DiffMoE samples
        v_u = model(x, t, null, x0_hat=x0_hat)[0]
        return v_u + cfg_scale * (v_c - v_u), routes
    v, _, routes = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), x0_hat=torch.cat([x0_hat, x0_hat]))
    v_c, v_u = v.chunk(2)                                       # (B, C, H, W) each
    B = x.shape[0]
    return v_u + cfg_scale * (v_c - v_u), [(gates[:B], mask[:B]) for gates, mask in routes]


@torch.no_grad()
def euler_steps(model, noise, y, steps=250, cfg_scale=1.5):
    """Euler from t = 1 to 0. Yields (t, x, routes) per step: the step's t (B,), x after the step
    (at the next t; the image after the last one) and the step's routes. R_sal routes with
    x0_hat = x_t - t v (guided) of the previous step, the first step with x_t itself. Call
    model.eval() first (DiffMoE: dynamic capacity)."""
    ts = torch.linspace(1, 0, steps + 1, device=noise.device)
    x, x0_hat = noise, noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        tb = t.expand(x.shape[0])
        v, routes = guided_velocity(model, x, tb, y, x0_hat, cfg_scale)
        x0_hat = x - t * v
        x = x + (t_next - t) * v
        yield tb, x, routes


def sample(model, noise, y, steps=250, cfg_scale=1.5):
    """x at t = 0 (B, C, H, W) from noise (B, C, H, W) and labels (B,): images in about [-1, 1]
    (not clamped: common.to_uint8 clamps) or, for a latent model, VAE latents to decode."""
    x = noise
    for _, x, _ in euler_steps(model, noise, y, steps, cfg_scale):
        pass                                                    # keep the x of the last step
    return x


# ----------------------------------------------------------------------------------------------
# Measuring routing: expert count against saliency, per denoising step
#
# The paper's key figure is the expert count of each token against its Laplacian saliency, per
# denoising step, "along the generation rollout". Three views of that measure, because they
# answer different questions (README and compare.py use the same names):
#   noised     routing_probe: real held-out images noised along one trajectory, x0_hat chained;
#              no feedback from counts to saliency, and a held-out loss beside it; but early x_t
#              say little of the image
#   rollout    rollout_routing: the sampler's own rollout against the saliency of the generated
#              image (the paper's view); here counts can cause saliency (more experts, more detail)
#   reference  routing_along: a dense model's rollout routed by any model, x0_hat chained from
#              its own velocity: generation without that feedback
# count_saliency turns each into per-step correlations: the raw one (the paper's) and one
# controlled for position (ours).

def ranks(x):
    """Ranks along the last dim of (B, N), from 1; ties get their average rank."""
    less = (x[:, :, None] > x[:, None, :]).sum(-1).float()      # (B, N)
    equal = (x[:, :, None] == x[:, None, :]).sum(-1).float()
    return less + (equal + 1) / 2


def rank_correlation(a, b):
    """Spearman correlation per row of (B, N) tensors, (B,). A row with no spread (say, token
    choice's equal counts) has correlation 0."""
    ra, rb = standardize(ranks(a.float())), standardize(ranks(b.float()))
    corr = (ra * rb).sum(-1) / (a.shape[-1] - 1)
    spread = (a.float().std(-1) > 0) & (b.float().std(-1) > 0)
    return torch.where(spread, corr, torch.zeros_like(corr))


def position_controlled_correlation(count, M):
    """Does a token get more experts where it is more salient than that position usually is?
    A partial correlation over all tokens of all B images: expert counts (B, N) and saliency
    ranks within each image, both less their mean per token position over the images and their
    mean per image (the counts' per-image mean varies under DiffMoE, whose pool spans the batch).
    0 for any router whose counts depend on position only, however well it scores on the raw
    correlation; and, unlike a semipartial correlation (position taken out of the saliency
    alone), a positional pattern in the counts does not lower the score of what lies beyond it."""
    c, r = residual(count.float()), residual(ranks(M.float()))
    return (c * r).sum() / (c.norm() * r.norm() + 1e-12)


def residual(a):
    """(B, N) less its per-position and per-image means (the grand mean added back)."""
    return a - a.mean(0, keepdim=True) - a.mean(1, keepdim=True) + a.mean()


def count_saliency(counts, M):
    """Per step, from counts (K, B, N) and the saliency M (B, N) of the images they are measured
    against: `corr`, the mean per-image rank correlation (the paper's measure), and `corr_pos`,
    position_controlled_correlation (a router that learned only "the centre is salient" gets 0)."""
    return dict(corr=torch.stack([rank_correlation(c, M).mean() for c in counts]),
                corr_pos=torch.stack([position_controlled_correlation(c, M) for c in counts]))


def saliency_quintiles(count, M):
    """(5,): the mean expert count (B, N) of the tokens in each saliency quintile of their own
    image, Q1 the least salient."""
    quintile = M.argsort(1).argsort(1) * 5 // M.shape[1]       # (B, N) in 0..4
    return torch.stack([count.float()[quintile == q].mean() for q in range(5)])


# The probe's timesteps: from t_1 = 0.999, as training and sampling chain x0_hat, at most 0.15 apart.
PROBE_T = (0.999, 0.95, 0.875, 0.8, 0.65, 0.5, 0.35, 0.2, 0.125, 0.05)
SHOW_T = (0.999, 0.95, 0.8, 0.5, 0.2, 0.05)                    # the steps that logs and tables show
EARLY = 0.8                                                     # "early steps": t >= 0.8


def show_steps(ts):
    """Indices of the steps of ts (K,) nearest to SHOW_T, each once: the steps tables show."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    return list(dict.fromkeys(int((ts - t).abs().argmin()) for t in SHOW_T))


@torch.no_grad()
def routing_probe(model, x0, y, eps, ts=PROBE_T, oracle=False):
    """The noised view, on fixed images x0 (held out from training), labels y and noise eps:
    one noised trajectory per image, x_t = interpolate(x0, eps, t), with x0_hat chained from
    t = 0.999 as in training and sampling. Returns (K,) tensors corr and corr_pos (count_saliency), loss (the
    flow-matching loss at the same t and noise), and counts (K, B, N). oracle: route with the
    true x0 (for a model trained that way)."""
    mode = model.training
    model.eval()
    ts = torch.tensor(ts, device=x0.device)[:, None].expand(-1, x0.shape[0])
    xs = [interpolate(x0, eps, t) for t in ts]
    counts, loss = [], []
    for v, _, routes in unroll(model, xs, ts, y, x0 if oracle else None):
        counts.append(expert_count(routes))
        loss.append(F.mse_loss(v.float(), flow_target(x0, eps)))
    model.train(mode)
    counts = torch.stack(counts)
    return dict(count_saliency(counts, laplacian_saliency(x0, model.cfg.patch_size)),
                loss=torch.stack(loss), counts=counts)


@torch.no_grad()
def rollout_routing(model, noise, y, steps, cfg_scale=1.0):
    """The rollout view: generate with euler_steps, recording each token's expert count at
    every step (conditional half, summed over MoE layers). Returns the generated x (B, C, H, W), ts (K,),
    counts (K, B, N) (None for a dense model) and states (K, B, C, H, W), the x each step
    started from. Call model.eval() first."""
    x, ts, counts, states = noise, [], [], []
    for t, x_next, routes in euler_steps(model, noise, y, steps, cfg_scale):
        ts.append(t[0])
        states.append(x)
        counts += [expert_count(routes)] if routes else []
        x = x_next
    return x, torch.stack(ts), torch.stack(counts) if counts else None, torch.stack(states)


@torch.no_grad()
def routing_along(model, states, ts, y, cfg_scale=1.0, oracle_x0=None):
    """The reference view: the expert counts (K, B, N) of `model` routing the given states
    (K, B, C, H, W) at times ts (K,), labels y (B,), with x0_hat chained from its own guided
    velocity as the sampler chains it (guided_velocity; the conditional half's routes).
    oracle_x0: route with these final images instead (for a model trained with the true x0)."""
    mode = model.training
    model.eval()
    counts, x0_hat = [], states[0]                              # step 1 routes with x_t itself
    for x, t in zip(states, ts):
        v, routes = guided_velocity(model, x, t.expand(x.shape[0]), y,
                                    x0_hat if oracle_x0 is None else oracle_x0, cfg_scale)
        counts.append(expert_count(routes))
        x0_hat = x - t * v
    model.train(mode)
    return torch.stack(counts)


# ----------------------------------------------------------------------------------------------
# The same gradient, one step's graph at a time (ours)
#
# x0_hat is detached between steps, so the T steps of a trajectory are coupled only through A
# summed over them (scope "trajectory"): dL_routing / dtheta = sum_k <g, dA_k / dtheta> with
# g = dL_routing / dA. So (1) a no-grad unroll gives sum_k A_k and, on a detached leaf, g; (2)
# each step runs again with grad and back-propagates its own fm_k / T + aux_k / T + lambda
# <g, A_k> before the next. Memory: one step's graph instead of T; time: one more forward per
# step. With scope "step" each step's loss is complete on its own and (1) is skipped.

def trajectory_backward_stepwise(model, cfg, x0, y, draw, opts, autocast=nullcontext, no_sync=nullcontext):
    """Back-propagates exactly what trajectory_loss(...) + aux would (tested to 1e-5), holding one
    step's graph at a time. autocast wraps each forward; no_sync (DDP's) all but the last
    step's backward, so gradients are all-reduced once. Returns forward_backward's stats."""
    T = draw.ts.shape[0]
    M = saliency_target(x0, cfg, opts)
    coupled = cfg.router != "tc" and opts.scope == "trajectory"
    if coupled:                                                 # (1)
        with torch.inference_mode(), autocast():
            A = sum(A_k for _, _, A_k, _ in trajectory_terms(model, cfg, x0, y, draw, opts))
        A = A.clone().requires_grad_(True)                      # (out of inference mode)
        L_routing = routing_term([A], M, opts)
        g, = torch.autograd.grad(L_routing, A)                  # (B, N)
    fm_sum, aux_sum, step_losses, counts = 0.0, 0.0, 0.0, []
    steps = trajectory_terms(model, cfg, x0, y, draw, opts)
    for k in range(T):                                          # (2)
        with no_sync() if k < T - 1 else nullcontext():
            with autocast():
                fm, aux, A_k, count = next(steps)
                fm = fm / T
                loss = fm + aux / T
                if coupled:
                    loss = loss + opts.lam * (g * A_k).sum()
                elif A_k is not None:                           # scope "step": its own term
                    L_k = routing_term([A_k], M, opts) / T
                    loss, step_losses = loss + opts.lam * L_k, step_losses + L_k.detach()
            loss.backward()
        fm_sum, aux_sum = fm_sum + fm.detach(), aux_sum + torch.as_tensor(aux, device=x0.device).detach() / T
        counts.append(count)
    routing = L_routing.detach() if coupled else (step_losses if A_k is not None else fm_sum * 0)
    return dict(fm=fm_sum, aux=aux_sum, routing=routing, counts=torch.stack(counts))
