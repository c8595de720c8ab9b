"""The DAPO image encoder and scoring head in plain PyTorch, built from `encoder.safetensors`.

This is what the torch backend runs, without `training/` or OpenCLIP: a standard CLIP ViT
(pre-norm blocks, GELU or QuickGELU, token pooling) with deep visual prompts, adapters and the
scoring head. The OpenCLIP ViT options it reproduces are exactly those `EncoderOptions` names
(LayerScale, no LayerNorm before the blocks, the LayerNorm eps, the MLP width); bake refuses to
write `encoder.safetensors` for a tower with any other option (`training.export.
torch_export_supported`), so nothing is served wrong. Weights come from safetensors only (no pickle). `ScoringHead` is also what
`training/export.py` puts at the end of the ONNX graph, so both backends score with one code.

Attention uses `F.scaled_dot_product_attention`, which picks flash / memory-efficient kernels
on a GPU; the module runs in fp32, fp16 or bf16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from service.runtime.artifact import EncoderGeometry
from service.runtime.backends.base import reference_taps


def similarity_logits(features: torch.Tensor, text: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """(..., D) features against (C, D) text features, divided by tau: every DAPO score is a
    softmax of these. Shared by `ScoringHead` and `training.model.DapoModel.forward`."""
    return features @ text.T * inv_tau


def patch_class_probs(patches: list[torch.Tensor], text: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """(L, B, N, C): per tapped layer, each patch's softmax over the C classes. Shared as above."""
    return torch.stack([torch.softmax(similarity_logits(p, text, inv_tau), dim=-1) for p in patches])


DEFAULT_NORM_EPS = EncoderGeometry.model_fields["norm_eps"].default


@dataclass(frozen=True)
class EncoderOptions:
    """The OpenCLIP ViT options beyond plain CLIP that the encoder reproduces (manifest fields)."""

    act: str = "gelu"  # "gelu" (exact, erf) or "quick_gelu"
    layer_scale: bool = False  # OpenCLIP ls_init_value: x + gamma * f(x) in both residual branches
    ln_pre: bool = True  # False = OpenCLIP no_ln_pre (e.g. DINOv2)
    norm_eps: float = DEFAULT_NORM_EPS  # every LayerNorm of the tower
    mlp_width: int | None = None  # None = 4 * width


def reference_features(tapped: list[torch.Tensor]) -> torch.Tensor:
    """Patch tokens (B, N, W) of the `reference_taps` blocks -> (B, N, F): each tap L2-normalised,
    concatenated, scaled to unit norm (so a squared distance is 2 - 2 cos, within [0, 4])."""
    scale = 1.0 / math.sqrt(len(tapped))
    return torch.cat([F.normalize(t.float(), dim=-1) for t in tapped], dim=-1) * scale


class ScoringHead(nn.Module):
    """Text features baked in; global + per-tap patch features -> the backend contract outputs."""

    def __init__(self, text_features: torch.Tensor, abnormal: torch.Tensor, grid: int, image_size: int,
                 temperature: float):
        super().__init__()
        self.register_buffer("text", text_features.float().clone())  # (C, D)
        self.register_buffer("pair", torch.stack([text_features[0], abnormal]).float().clone())  # (2, D)
        self.grid = grid
        self.image_size = image_size
        self.inv_tau = 1.0 / temperature

    def forward(self, global_feat: torch.Tensor, patches: list[torch.Tensor], allowed: torch.Tensor):
        text = self.text.to(global_feat.dtype)
        pair = self.pair.to(global_feat.dtype)
        anomaly_score = torch.softmax(similarity_logits(global_feat, pair, self.inv_tau), dim=-1)[:, 1]
        type_scores = torch.softmax(similarity_logits(global_feat, text, self.inv_tau), dim=-1)
        probs = patch_class_probs(patches, text, self.inv_tau).mean(0)
        b, _, c = probs.shape
        probs = probs.transpose(1, 2).reshape(b, c, self.grid, self.grid)
        # Upsampling is linear, so summing layers first then upsampling once equals METHOD's order.
        up = F.interpolate(probs, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)
        anomaly_map = up[:, 1:].sum(dim=1)
        masked = up.masked_fill(~allowed[:, :, None, None], -1.0)
        type_map = masked.argmax(dim=1).to(torch.uint8)
        class_max = up.amax(dim=(2, 3))
        # the type of a pixel that something else (the reference branch) calls defective: the
        # argmax over the allowed defect classes alone, normal excluded
        defect_type_map = (masked[:, 1:].argmax(dim=1) + 1).to(torch.uint8)
        return (anomaly_score.float(), type_scores.float(), anomaly_map.float(), type_map, class_max.float(),
                up.float(), defect_type_map)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out_proj(y.transpose(1, 2).reshape(b, n, w))


class _LayerScale(nn.Module):
    """OpenCLIP's LayerScale: a learned per-channel gain (parameter name `gamma`)."""

    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.to(x.dtype)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, opts: EncoderOptions):
        super().__init__()
        if opts.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"activation {opts.act!r} is not in the torch encoder (gelu, quick_gelu)")
        mlp = opts.mlp_width or 4 * width
        self.ln_1 = nn.LayerNorm(width, eps=opts.norm_eps)
        self.attn = _Attention(width, heads)
        self.ls_1 = _LayerScale(width) if opts.layer_scale else nn.Identity()
        self.ln_2 = nn.LayerNorm(width, eps=opts.norm_eps)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, mlp), "c_proj": nn.Linear(mlp, width)})
        self.ls_2 = _LayerScale(width) if opts.layer_scale else nn.Identity()
        self.quick = opts.act == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x)))
        h = self.mlp["c_fc"](self.ln_2(x))
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)
        return x + self.ls_2(self.mlp["c_proj"](h))


class DapoImageEncoder(nn.Module):
    """ViT + deep visual prompts + adapters + scoring head; parameter names match the bake."""

    def __init__(self, geometry: EncoderGeometry, text_features: torch.Tensor, abnormal: torch.Tensor):
        super().__init__()
        g = geometry
        opts = EncoderOptions(act=g.act, layer_scale=g.layer_scale, ln_pre=g.ln_pre, norm_eps=g.norm_eps,
                              mlp_width=g.mlp_width)
        width, grid = g.width, g.grid
        self.conv1 = nn.Conv2d(3, width, g.patch_size, g.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=g.norm_eps) if g.ln_pre else nn.Identity()
        self.blocks = nn.ModuleList(_Block(width, g.heads, opts) for _ in range(g.layers))
        self.ln_post = nn.LayerNorm(width, eps=g.norm_eps)
        self.proj = nn.Parameter(torch.empty(width, g.embed_dim))
        self.prompt_tokens = nn.Parameter(torch.empty(g.layers, g.prompt_tokens, width))
        self.adapters = nn.ModuleList(nn.Linear(width, g.embed_dim) for _ in g.taps)
        self.taps = list(g.taps)
        self.alpha = g.alpha
        self.head = ScoringHead(text_features, abnormal, grid, g.image_size, g.temperature)

    def forward(self, pixel_values: torch.Tensor, allowed: torch.Tensor):
        n = self.prompt_tokens.shape[1]
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = torch.cat([x[:, :1], self.prompt_tokens[0].expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        patches, raw = [], []
        keep = set(reference_taps(self.taps))
        for i, block in enumerate(self.blocks):
            if i > 0:
                slots = self.alpha * x[:, 1:1 + n] + (1.0 - self.alpha) * self.prompt_tokens[i].to(x.dtype)
                x = torch.cat([x[:, :1], slots, x[:, 1 + n:]], dim=1)
            x = block(x)
            if i + 1 in self.taps:
                patches.append(F.normalize(self.adapters[self.taps.index(i + 1)](x[:, 1 + n:]), dim=-1))
            if i + 1 in keep:
                raw.append(x[:, 1 + n:])
        pooled = F.normalize(self.ln_post(x[:, 0]) @ self.proj, dim=-1)
        return (*self.head(pooled, patches, allowed), reference_features(raw), pooled.float())


def state_dict_for_export(visual: nn.Module, prompt_tokens: torch.Tensor, adapters: nn.ModuleList) -> dict:
    """Map an OpenCLIP VisionTransformer + DAPO parts onto DapoImageEncoder's parameter names."""
    sd = {k: v for k, v in visual.state_dict().items() if not k.startswith("transformer.")}
    for k, v in visual.transformer.state_dict().items():
        # resblocks.{i}.attn.*, ln_1, ln_2, mlp.c_fc, mlp.c_proj -> blocks.{i}.*
        sd["blocks." + k.removeprefix("resblocks.")] = v
    sd["prompt_tokens"] = prompt_tokens.detach()
    for j, a in enumerate(adapters):
        sd[f"adapters.{j}.weight"] = a.weight.detach()
        sd[f"adapters.{j}.bias"] = a.bias.detach()
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def load_encoder(weights_path: str, geometry: EncoderGeometry, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> DapoImageEncoder:
    """Build DapoImageEncoder from the manifest's geometry and load `encoder.safetensors` (strict)."""
    from pathlib import Path

    from safetensors.torch import load_file

    if not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"{weights_path}: this artifact has no torch encoder. Bake writes none for a vision tower the torch "
            "encoder cannot reproduce (the manifest's provenance.torch_backend says why); serve it with the "
            "onnxruntime backend (DAPO_BACKEND=onnxruntime)")
    sd = load_file(weights_path, device="cpu")
    model = DapoImageEncoder(geometry, text_features=sd.pop("head.text"), abnormal=sd.pop("head.abnormal"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"{weights_path}: weights do not fit the encoder (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device=device, dtype=dtype).eval()
