"""
SharpMoE: saliency-harnessing routing for diffusion Mixture-of-Experts, in one file.

Paper: "Focusing on What Matters: Saliency-Harnessing Accurate Routing for Diffusion MoE",
Deng et al., arXiv 2606.26938 (ECCV 2026). No official code exists; this is a reference.

What is here, top to bottom:
  - a DiT (Peebles & Xie) that predicts the rectified-flow velocity v, whose FFN is either a
    dense MLP or an MoE layer with one of three routers:
        tc      token choice: each token takes its top-k experts (same compute per token)
        ec      expert choice inside each image: each expert takes its top-C tokens
        diffmoe expert choice over the batch's token pool, with DiffMoE's capacity predictor
                and per-expert thresholds (dynamic capacity at inference)
  - SharpMoE part 1, the dual router: logits S = R_pre(h_t) + R_sal(features of x0_hat)
  - SharpMoE part 2, the recursive trajectory step (T steps of one trajectory, x0_hat chained)
  - SharpMoE part 3, the trajectory routing loss KL(softmax(A) || softmax(M)) against the
    Laplacian saliency M of the clean image
  - the Euler sampler with classifier-free guidance and x0_hat carried into the router, and the
    routing probe (expert count against saliency per denoising step, raw and beyond position).

Conventions (paper): t in [0, 1], t = 1 is pure noise; x_t = (1 - t) x0 + t eps; v = eps - x0;
clean estimate x0_hat = x_t - t v. Symbols: B images of N tokens of width D; E experts; S the
routing logits (B, N, E) and gates = softmax_E(S); mask the selection (B, N, E); C an expert's
capacity; A the routed mass and M the saliency (B, N), as in the paper.

Choices that are ours where the paper gives none:
  - R_sal's input is the model's own patch embedding (+ position embedding) of x0_hat, computed
    once per forward and shared by all MoE layers; its hidden width is `sal_hidden`.
  - Trajectory timesteps: t_1 = 0.999, then one uniform draw in each of T - 1 equal bins below.
  - Routing loss: A and M are standardized per image (zero mean, unit std) and divided by a
    temperature (`temp`) before the softmax; raw Laplacian magnitudes give an almost uniform
    softmax.
  - Experts use the exact GELU (DiT uses the tanh approximation, several times slower on CPU).
  - DiffMoE's thresholds start at 0 (its capacity predictor, Linear(D, D)-SiLU-Linear(D, E), is
    as in DiffMoE's code).
  - Gates are softmax probabilities over experts and are not renormalized after selection.
  - Beside the paper's routing loss (the defaults), three options, measured in README: a
    count-aware routed mass (`mass="count"`: under expert choice the paper's gate mass can lower
    a token's expert count when the loss raises its mass), one KL per step instead of one on the
    trajectory sum (`target="step"`), and a position-debiased saliency target (`saliency_mean`).
  - Every iteration's randomness (timesteps, noise, label drops) is drawn once, up front
    (training_noise), so that train.py can draw it for the global batch: runs do not depend on
    the number of GPUs.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, fields

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
    router: str = "ec"            # the routing rule, one of ROUTERS (the layers' R_pre is `pre_router`)
    num_experts: int = 0          # 0: the paper's choice, 16 for diffmoe and 8 for tc / ec
    top_k: int = 1                # experts per token on average (paper: about 1)
    moe_every: int = 2            # an MoE layer in every moe_every-th block (paper: every other)
    threshold_decay: float = 0.95  # DiffMoE: EMA of the per-expert thresholds
    sharpmoe: bool = False        # the model has the saliency routers R_sal
    sal_hidden: int = 64          # R_sal hidden width (our choice)

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
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
    "cpu": dict(depth=6, width=96, heads=4, patch_size=4),    # 32x32 pixels -> 64 tokens
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

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)   # (B, N, D) by (B, D)


def sincos_1d(pos, dim):
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]                   # (N, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed(dim, grid):
    """Fixed 2D sin-cos position embedding, (grid*grid, dim), as in DiT / MAE."""
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
        return self.mlp(timestep_embedding(t, self.freq_dim))


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
# into a selection mask (B*N, E). Fixed capacity (ec; diffmoe in training) also gives `slots`
# (E, C): the token indices each expert processes, so that all experts run as one batched matmul.
# Variable counts (tc; diffmoe at inference) sort the tokens by expert and run one grouped matmul.

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

    def ragged(self, x, counts):
        """Variable counts: x (P, D), P (token, expert) pairs sorted by expert, counts (E,) ->
        (P, D). One grouped matmul on the CPU; elsewhere a loop over experts (grouped_mm's GPU
        kernels want bf16 and aligned shapes)."""
        if x.device.type != "cpu":
            return self.ragged_loop(x, counts)
        offs = counts.cumsum(0).int()
        h = F.gelu(F.grouped_mm(x, self.w1, offs=offs) + self.b1.repeat_interleave(counts, 0))
        return F.grouped_mm(h, self.w2, offs=offs) + self.b2.repeat_interleave(counts, 0)

    def ragged_loop(self, x, counts):
        chunks = x.split(counts.tolist())                       # E chunks of (n_e, D)
        return torch.cat([torch.addmm(self.b2[e], F.gelu(torch.addmm(self.b1[e], xe, self.w1[e])), self.w2[e])
                          for e, xe in enumerate(chunks)])


class SaliencyRouter(nn.Module):
    """R_sal (SharpMoE part 1, the dual router): a two-layer SiLU MLP on the tokens of x0_hat.
    FOOTGUN: only the OUTPUT layer starts at zero. With both at zero, SiLU(0) = 0 and no gradient
    ever reaches either layer; with the output at zero the model starts exactly as pretrained."""

    def __init__(self, dim, hidden, E):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, E)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x0_hat_emb):
        return self.fc2(F.silu(self.fc1(x0_hat_emb)))           # (B, N, D) -> (B, N, E)


class MoE(nn.Module):
    """An MoE FFN: routing logits S = R_pre(h) [+ R_sal(x0_hat_emb)], gates = softmax_E(S), a
    selection by the configured rule, and the selected experts' outputs weighted by their gates.
    forward returns (out, aux, (gates, mask)): the gates and selection are what the routing loss
    and the expert counts are made of, each (B, N, E)."""

    def __init__(self, cfg):
        super().__init__()
        D, E = cfg.width, cfg.num_experts
        self.rule, self.E, self.k, self.decay = cfg.router, E, cfg.top_k, cfg.threshold_decay
        self.pre_router = nn.Linear(D, E, bias=False)           # R_pre
        self.sal_router = SaliencyRouter(D, cfg.sal_hidden, E) if cfg.sharpmoe else None   # R_sal
        self.experts = Experts(E, D, int(D * cfg.mlp_ratio))
        if self.rule == "diffmoe":                              # DiffMoE's capacity predictor
            self.capacity_predictor = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, E))
            self.register_buffer("thresholds", torch.zeros(E))

    def forward(self, x, x0_hat_emb=None):
        B, N, D = x.shape
        S = self.pre_router(x)                                  # (B, N, E)
        if self.sal_router is not None:
            S = S + self.sal_router(x0_hat_emb)                 # S = R_pre(h_t) + R_sal(x0_hat)
        gates = S.softmax(-1).view(B * N, self.E)               # (B*N, E)
        flat = x.reshape(B * N, D)
        slots, aux = None, x.new_zeros(())
        if self.rule == "ec":
            slots = expert_choice_in_image(gates, B, N * self.k // self.E)
            mask = slots_to_mask(slots, B * N)
        elif self.rule == "tc":
            mask = token_choice(gates, self.k)
        elif self.training:                                     # diffmoe, fixed capacity
            slots = expert_choice_in_pool(gates, B * N * self.k // self.E)
            mask = slots_to_mask(slots, B * N)
            if torch.is_grad_enabled():                         # (a no-grad pre-pass must not move the thresholds)
                aux = self.train_capacity_predictor(flat, mask)
        else:                                                   # diffmoe, dynamic capacity
            cap_scores = self.capacity_predictor(flat).sigmoid()
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
        out = torch.zeros_like(flat)
        return out.index_add_(0, slots.flatten(), (y * w.unsqueeze(-1)).flatten(0, 1))

    def dispatch_ragged(self, flat, gates, mask):
        expert, tok = mask.t().nonzero(as_tuple=True)           # (P,) each, sorted by expert
        counts = mask.sum(0)                                    # (E,) tokens per expert
        y = self.experts.ragged(flat.index_select(0, tok), counts)   # (P, D)
        out = torch.zeros_like(flat)
        return out.index_add_(0, tok, y * gates[tok, expert].unsqueeze(-1))

    def train_capacity_predictor(self, flat, mask):
        """DiffMoE: BCE of the predictor (on detached states) against the selection; thresholds
        track, by EMA, the C-th highest predictor score of each expert, averaged across ranks."""
        cap_logits = self.capacity_predictor(flat.detach())     # (B*N, E)
        with torch.no_grad():
            C = int(mask[:, 0].sum())
            kth = cap_logits.sigmoid().t().topk(C, dim=1).values[:, -1].contiguous()   # (E,)
            # (all_reduce needs it contiguous: on the strided view the ranks' thresholds drifted apart)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(kth)
                kth /= dist.get_world_size()
            self.thresholds.lerp_(kth.float(), 1 - self.decay)
        return F.binary_cross_entropy_with_logits(cap_logits, mask.float())


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
            x0_hat_emb = self.x_embedder(x0_hat) + self.pos_embed   # (B, N, D)
        aux, routes = 0.0, []
        for block in self.blocks:
            h, a, route = block(h, c, x0_hat_emb)
            aux = aux + a
            routes += [route] if route is not None else []
        return self.unpatchify(self.final_layer(h, c)), aux, routes


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
# Losses: rectified flow, the SharpMoE trajectory, saliency and the routing loss

def trajectory_timesteps(T, B, generator=None, device="cpu"):
    """(T, B) descending timesteps: t_1 = 0.999, then one uniform draw in each of T - 1 equal
    bins of [0, 0.999) from the top (our choice; the paper gives only t_1)."""
    t1 = 0.999
    width = t1 / (T - 1)
    top = t1 - width * torch.arange(T - 1, device=device)       # upper edge of each bin
    rest = top[:, None] - width * torch.rand(T - 1, B, generator=generator, device=device)
    return torch.cat([torch.full((1, B), t1, device=device), rest], 0)


def training_noise(cfg, B, T=1, generator=None, device="cpu", logit_normal=False):
    """Everything random in one training iteration, drawn at once: timesteps ts (T, B) (T = 1:
    one-step training, uniform or SD3's logit-normal; T > 1: one SharpMoE trajectory), the noise
    eps (B, C, H, W) that all T steps share, and the CFG label drop (B,), one per trajectory."""
    kw = dict(generator=generator, device=device)
    if T > 1:
        ts = trajectory_timesteps(T, B, **kw)
    else:
        ts = torch.randn(1, B, **kw).sigmoid() if logit_normal else torch.rand(1, B, **kw)
    eps = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, **kw)
    drop = torch.rand(B, **kw) < cfg.class_dropout
    return ts, eps, drop


def drop_labels(y, drop, num_classes):
    """Classifier-free guidance training: labels where `drop` is set become the null class.
    FOOTGUN: the null class is the extra index num_classes, not 0 (0 is a real class)."""
    return torch.where(drop, torch.full_like(y, num_classes), y)


def interpolate(x0, eps, t):
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x0 + t * eps                               # x_t, t = 1 is noise


def flow_loss(model, cfg, x0, y, noise):
    """One-step rectified flow: mean ||v_theta(x_t, t, y) - (eps - x0)||^2, with noise from
    training_noise(cfg, B). Returns (loss, aux, routes)."""
    ts, eps, drop = noise
    v, aux, routes = model(interpolate(x0, eps, ts[0]), ts[0], drop_labels(y, drop, cfg.num_classes))
    return F.mse_loss(v.float(), eps - x0), aux, routes


def laplacian_saliency(x0, patch_size):
    """M (SharpMoE part 3): |Laplacian(x0)|, channel mean, average-pooled per patch. (B, N).
    Replicate padding, so a flat image has zero saliency everywhere, borders included."""
    B, ch, H, W = x0.shape
    k = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]], device=x0.device, dtype=x0.dtype)
    x = F.pad(x0.reshape(B * ch, 1, H, W), (1, 1, 1, 1), mode="replicate")
    lap = F.conv2d(x, k.view(1, 1, 3, 3)).abs().view(B, ch, H, W).mean(1, keepdim=True)
    return F.avg_pool2d(lap, patch_size).flatten(1)             # (B, N)


def saliency_target(x0, patch_size, saliency_mean=None):
    """M of the routing loss; given saliency_mean (N,), the training data's mean saliency per token
    position, the residual M - saliency_mean (ours: no reward for routing by position alone)."""
    M = laplacian_saliency(x0, patch_size)
    return M if saliency_mean is None else M - saliency_mean


def standardize(a):
    return (a - a.mean(-1, keepdim=True)) / (a.std(-1, keepdim=True) + 1e-6)


def routing_loss(A, M, temp=1.0):
    """KL(softmax(A) || softmax(M)) over the tokens of each image, averaged over images.
    A, M: (B, N); both standardized per image first (our choice, see the docstring). Which A it
    aligns with M decides what it does to expert counts: see routed_mass."""
    log_p = F.log_softmax(standardize(A) / temp, dim=-1)
    log_q = F.log_softmax(standardize(M) / temp, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


# The candidate pool among which each expert chooses, as dims of (B, N, E): an image's tokens for
# ec, the whole batch's tokens for diffmoe (tc has no per-token count to shape).
POOL_DIMS = {"ec": (1,), "diffmoe": (0, 1)}
SOFT_COUNT_WIDTH = 0.1     # tau as a fraction of the spread of an expert's gates in its pool (ours)


def routed_mass(routes, rule, mass="gate"):
    """A for one step, (B, N), summed over MoE layers l and experts e, differentiable through the
    gates. mass="gate", the paper's: A_i = sum 1[token i selected by e] * gates_l(i, e). Under
    expert choice, raising it moves a token's gates onto the experts that already chose it,
    away from all others: it can lower the token's count (README, "Mass is not count").
    mass="count", ours: a soft count, A_i = sum sigmoid((gates_l(i, e) - theta) / tau), theta
    the midpoint between the weakest selected and the strongest rejected gate of expert e in its
    pool, tau a fraction of that expert's gate spread (both detached): raising it raises the
    token's gate where the token is near an expert's cut, so it gains experts."""
    if mass == "gate":
        return sum((mask * gates).sum(-1) for gates, mask in routes)
    A = 0.0
    for gates, mask in routes:
        pool = POOL_DIMS[rule]
        with torch.no_grad():
            weakest_in = torch.where(mask, gates, torch.inf).amin(pool, keepdim=True)
            strongest_out = torch.where(mask, -torch.inf, gates).amax(pool, keepdim=True)
            theta = (weakest_in + strongest_out) / 2            # (B or 1, 1, E): each expert's cut
            tau = SOFT_COUNT_WIDTH * gates.std(pool, keepdim=True) + 1e-12
        A = A + torch.sigmoid((gates - theta) / tau).sum(-1)
    return A


def unroll(model, x0, y, ts, eps, oracle=False):
    """Run the model along one noised trajectory (SharpMoE part 2): every x_t from the same x0
    and eps; step k routes with x0_hat from step k-1 (detached), step 1 with x_{t_1} itself.
    `oracle` routes with the true x0 instead (an ablation bound). Yields (t, x_t, v, aux, routes)."""
    x0_hat = interpolate(x0, eps, ts[0])                        # step 1: no previous estimate
    for t in ts:                                                # ts: (T, B), descending
        xt = interpolate(x0, eps, t)
        if oracle:
            x0_hat = x0
        v, aux, routes = model(xt, t, y, x0_hat=x0_hat)
        yield t, xt, v, aux, routes
        x0_hat = (xt - t.view(-1, 1, 1, 1) * v).detach().to(x0.dtype)   # x0_hat_k = x_t - t v


def trajectory_loss(model, cfg, x0, y, noise, lam=0.001, temp=1.0, mass="gate", target="trajectory",
                    saliency_mean=None, oracle=False):
    """SharpMoE post-training (parts 2 and 3): L_fm, the mean flow-matching loss over the T steps
    of one trajectory, + lam * L_routing. noise: training_noise(cfg, B, T). L_routing compares
    the routed mass A (routed_mass: `mass` "gate" is the paper's, "count" ours) with the saliency
    M: target "trajectory" (the paper) takes one KL on A summed over the steps, "step" (ours) the
    mean of one KL per step, so that late steps cannot pay for early ones; saliency_mean: see
    saliency_target. tc is trained with L_fm only (its counts are all equal). Returns (loss, aux,
    stats)."""
    ts, eps, drop = noise
    T, y = ts.shape[0], drop_labels(y, drop, cfg.num_classes)
    routed = cfg.router != "tc"                                  # tc: every token gets k experts
    fm, aux, As, counts = 0.0, 0.0, [], []
    for t, xt, v, a, routes in unroll(model, x0, y, ts, eps, oracle):
        fm, aux = fm + F.mse_loss(v.float(), eps - x0) / T, aux + a / T
        As += [routed_mass(routes, cfg.router, mass).float()] if routed else []   # (B, N) per step
        counts.append(expert_count(routes).detach())
    M = saliency_target(x0, cfg.patch_size, saliency_mean)
    if not routed:
        L_routing = fm * 0
    elif target == "trajectory":
        L_routing = routing_loss(sum(As), M, temp)
    else:
        L_routing = sum(routing_loss(A, M, temp) for A in As) / T
    stats = dict(fm=fm.detach(), routing=L_routing.detach(), counts=torch.stack(counts))
    return fm + lam * L_routing, aux, stats


def trajectory_backward_stepwise(model, cfg, x0, y, noise, lam=0.001, temp=1.0, mass="gate", target="trajectory",
                                 saliency_mean=None, oracle=False, forward_context=nullcontext, no_sync=nullcontext):
    """Back-propagates exactly what trajectory_loss(...) + aux would, holding one step's graph
    at a time instead of T. x0_hat is detached between steps, so the steps are coupled only
    through A summed over the trajectory: (1) a no-grad unroll gives that sum and, on a detached
    leaf, g = dL_routing / dA; (2) each step runs again with grad and back-propagates its own
    fm_k / T + aux_k / T + lam * <g, A_k> before the next. With target "step" each step's loss is
    complete on its own and (1) is skipped. forward_context wraps each forward (autocast);
    no_sync (DDP's) wraps all but the last step, so gradients are all-reduced once. Returns the
    stats of trajectory_loss, and `aux`, the auxiliary loss it back-propagated."""
    ts, eps, drop = noise
    T, y = ts.shape[0], drop_labels(y, drop, cfg.num_classes)
    routed = cfg.router != "tc"
    M = saliency_target(x0, cfg.patch_size, saliency_mean)
    coupled = routed and target == "trajectory"
    if coupled:                                                 # (1)
        with torch.no_grad(), forward_context():
            A = sum(routed_mass(r, cfg.router, mass).float() for *_, r in unroll(model, x0, y, ts, eps, oracle))
        A.requires_grad_(True)
        L_routing = routing_loss(A, M, temp)
        g, = torch.autograd.grad(L_routing, A)                  # (B, N)
    fm_sum, aux_sum, step_losses, counts, steps = 0.0, 0.0, 0.0, [], unroll(model, x0, y, ts, eps, oracle)
    for k in range(T):                                          # (2)
        with no_sync() if k < T - 1 else nullcontext():
            with forward_context():
                t, xt, v, aux, routes = next(steps)
                fm = F.mse_loss(v.float(), eps - x0) / T
                loss = fm + aux / T
                if coupled:
                    loss = loss + lam * (g * routed_mass(routes, cfg.router, mass).float()).sum()
                elif routed:
                    L_k = routing_loss(routed_mass(routes, cfg.router, mass).float(), M, temp) / T
                    loss, step_losses = loss + lam * L_k, step_losses + L_k.detach()
            loss.backward()
        fm_sum, aux_sum = fm_sum + fm.detach(), aux_sum + torch.as_tensor(aux).detach() / T
        counts.append(expert_count(routes).detach())
    routing = L_routing.detach() if coupled else (step_losses if routed else fm_sum * 0)
    return dict(fm=fm_sum, aux=aux_sum, routing=routing, counts=torch.stack(counts))


# ----------------------------------------------------------------------------------------------
# The sampler: Euler from t = 1 to 0 with classifier-free guidance, x0_hat carried into the router

def guided_velocity(model, x, t, y, x0_hat, cfg_scale):
    """v = v_u + s (v_c - v_u); s = 1 is one conditional pass. Both halves route with the same
    x0_hat (SharpMoE part 1). Returns v and the routes of the conditional half.
    FOOTGUN: the unconditional label is the null class num_classes."""
    if cfg_scale == 1.0:
        v, _, routes = model(x, t, y, x0_hat=x0_hat)
        return v, routes
    null = torch.full_like(y, model.cfg.num_classes)
    v, _, routes = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), x0_hat=torch.cat([x0_hat, x0_hat]))
    v_c, v_u = v.chunk(2)
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
    (not clamped: sample.py's to_uint8 clamps) or, for a latent model, VAE latents to decode."""
    x = noise
    for _, x, _ in euler_steps(model, noise, y, steps, cfg_scale):
        pass                                                    # keep the x of the last step
    return x


# ----------------------------------------------------------------------------------------------
# Measuring routing: expert count against saliency

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
    The correlation, over all tokens of all B images, between the expert count (B, N) and each
    token's saliency rank within its image minus the mean of that rank over the images at the
    same position. Exactly 0 for any router whose counts depend on the position only (the
    residual sums to 0 at every position), however well such a router scores on the raw one."""
    r = ranks(M.float())
    r = r - r.mean(0, keepdim=True)                             # (B, N) beyond position
    c = count.float() - count.float().mean()
    return (c * r).sum() / (c.norm() * r.norm() + 1e-12)


# The probe's timesteps: from t_1 = 0.999, as training and sampling chain x0_hat, at most 0.15 apart.
PROBE_T = (0.999, 0.95, 0.875, 0.8, 0.65, 0.5, 0.35, 0.2, 0.125, 0.05)


@torch.no_grad()
def routing_probe(model, x0, y, eps, ts=PROBE_T, oracle=False):
    """The paper's key measurement, per denoising step, on fixed images x0 (held out from
    training), labels y and noise eps: one noised trajectory per image with x0_hat chained from
    t = 0.999 as in training and sampling. Returns (T,) tensors: `corr`, the mean rank
    correlation between each token's expert count (summed over MoE layers) and its Laplacian
    saliency; `corr_pos`, position_controlled_correlation (a router that learned only "the
    centre is salient" scores 0 there); `loss`, the flow-matching loss at the same t and noise;
    and `counts` (T, B, N). `oracle`: route with the true x0 (for a model trained with it)."""
    mode = model.training
    model.eval()
    M = laplacian_saliency(x0, model.cfg.patch_size)            # (B, N)
    ts = torch.tensor(ts, device=x0.device)[:, None].expand(-1, x0.shape[0])
    out = dict(corr=[], corr_pos=[], loss=[], counts=[])
    for t, xt, v, _, routes in unroll(model, x0, y, ts, eps, oracle):
        count = expert_count(routes)
        out["corr"].append(rank_correlation(count, M).mean())
        out["corr_pos"].append(position_controlled_correlation(count, M))
        out["loss"].append(F.mse_loss(v.float(), eps - x0))
        out["counts"].append(count)
    model.train(mode)
    return {k: torch.stack(v) for k, v in out.items()}
