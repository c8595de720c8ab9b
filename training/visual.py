"""The vision side of DAPO: deep visual prompts, the tapped-layer forward, per-tap adapters.

Works on any OpenCLIP VisionTransformer through its public attributes (conv1, class and
positional embeddings, ln_pre, resblocks, ln_post, proj), so the tiny test configs and
ViT-L/14@518 take the same path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.prompts import insert_slots, remove_slots, run_deep_layers


def embed_patches(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[class, patches] tokens with positions, after ln_pre: (B, 1 + g*g, W)."""
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(x)


def pool_global(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLIP's pooled image embedding from [class, patches] tokens (prompt slots already removed)."""
    pool = (lambda t: t[:, 1:].mean(1)) if visual.pool_type == "avg" else (lambda t: t[:, 0])
    pooled = visual.ln_post(pool(x)) if visual.final_ln_after_pool else pool(visual.ln_post(x))
    return pooled @ visual.proj if visual.proj is not None else pooled


def prompt_init_bound(patch: int, width: int) -> float:
    """uniform(-v, v) bound for visual prompts: v = sqrt(6 / (3 * patch_h * patch_w + width))."""
    return math.sqrt(6.0 / (3 * patch * patch + width))


class DeepVisualPrompts(nn.Module):
    """Learned visual tokens for every block and one Linear adapter per tapped block."""

    def __init__(self, visual: nn.Module, taps: list[int], n_tokens: int = 4, alpha: float = 0.01, seed: int = 0):
        super().__init__()
        width = visual.transformer.width
        layers = visual.transformer.layers
        bad = [t for t in taps if not 1 <= t <= layers]
        if bad:
            raise ValueError(f"tapped layers {bad} outside 1..{layers}")
        g = torch.Generator().manual_seed(seed + 1)
        bound = prompt_init_bound(visual.patch_size[0], width)
        self.tokens = nn.Parameter(torch.rand((layers, n_tokens, width), generator=g) * 2 * bound - bound)
        self.adapters = nn.ModuleList(nn.Linear(width, visual.output_dim) for _ in taps)
        for a in self.adapters:  # seeded, independent of global RNG state
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5), generator=g)
            nn.init.uniform_(a.bias, -1 / math.sqrt(width), 1 / math.sqrt(width), generator=g)
        self.taps = list(taps)
        self.alpha = alpha

    def forward(self, visual: nn.Module, pixels: torch.Tensor, raw: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Global feature (B, D) and per-tap patch features [(B, g*g, D)], all L2-normalised.
        `raw`, if given, receives each tap's patch tokens before its adapter (the export's
        reference features)."""
        n = self.tokens.shape[1]
        x = embed_patches(visual, pixels)
        x = insert_slots(x, self.tokens[0]) if n else x
        x, tapped = run_deep_layers(visual.transformer.resblocks, x, self.tokens, self.alpha, taps=set(self.taps))
        patches = [F.normalize(adapter(t[:, 1 + n:]), dim=-1) for adapter, t in zip(self.adapters, tapped)]
        if raw is not None:
            raw.extend(t[:, 1 + n:] for t in tapped)
        x = remove_slots(x, n)
        return F.normalize(pool_global(visual, x), dim=-1), patches
