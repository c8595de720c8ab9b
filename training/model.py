"""DapoModel: a frozen OpenCLIP backbone + hybrid text prompts + deep visual prompts + adapters.

Only the prompts and adapters learn; `learned_parameters()` is what the optimiser and the
checkpoint see. Scoring follows METHOD.md (tau = 0.07). `forward` computes its logits and patch
probabilities with the same functions as the served scoring head
(`service.runtime.backends.torch_model.similarity_logits` / `patch_class_probs`), but it cannot be
that head: the head holds the text features baked in as constants, while in training they are
recomputed from the learned prompts at every step, and the losses need logits and grid-resolution
probabilities, not the head's upsampled maps and argmax. That both give the same scores is
tested against a baked artifact (tests/test_bake.py::test_outputs_match_the_training_model).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from service.runtime.backends.torch_model import patch_class_probs, similarity_logits
from training.backbone import BackboneSpec, create_clip, default_taps, describe, image_normalisation
from training.prompts import HybridTextPrompts, TextMode, abnormal_feature
from training.visual import DeepVisualPrompts


@dataclass
class DapoConfig:
    """Every knob of the model, with METHOD.md's defaults; saved beside each checkpoint."""

    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    taps: list[int] | None = None  # 1-based; None = quarters of the depth (24 -> 6/12/18/24)
    n_ctx: int = 5
    n_sets: int = 10
    text_deep_tokens: int = 4
    text_deep_layers: int | None = None  # deep text depth D; None = the text tower's depth
    visual_deep_tokens: int = 4
    alpha: float = 0.01  # weight of the previous layer's slot outputs in the blend
    temperature: float = 0.07
    text_mode: TextMode = "fixed"
    seed: int = 42

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DapoConfig":
        d = dict(d)
        d["backbone"] = BackboneSpec(**d.get("backbone", {}))
        return cls(**d)


class DapoModel(nn.Module):
    def __init__(self, config: DapoConfig, clip: nn.Module | None = None, tokenizer=None):
        super().__init__()
        if clip is None:
            clip, tokenizer = create_clip(config.backbone)
        self.config = config
        self.clip = clip
        self.geometry = describe(clip)
        if config.taps is None:
            config.taps = default_taps(self.geometry["layers"])
        self.text_prompts = HybridTextPrompts(clip, tokenizer, config.n_ctx, config.n_sets, config.text_deep_tokens,
                                              config.alpha, config.text_mode, seed=config.seed,
                                              depth=config.text_deep_layers)
        self.visual_prompts = DeepVisualPrompts(clip.visual, config.taps, config.visual_deep_tokens, config.alpha,
                                                seed=config.seed)

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) for the pixels, from the backbone's own preprocessing config."""
        return image_normalisation(self.clip)

    def learned_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable state: everything except the frozen CLIP."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("clip.")}

    def train(self, mode: bool = True) -> "DapoModel":
        super().train(mode)
        self.clip.eval()  # frozen backbone: no dropout / patch dropout, ever
        return self

    def text_features(self, words: list[str]) -> torch.Tensor:
        """(1 + K, D): normal then each defect word, L2-normalised."""
        return self.text_prompts(self.clip, words)

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.visual_prompts(self.clip.visual, pixels)

    def forward(self, pixels: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training view: logits and per-tap patch probabilities at the patch grid.

        image_logits (B, 2) over [t_N, t_Abar]; type_logits (B, C); patch_probs (L, B, C, g, g).
        """
        inv_tau = 1.0 / self.config.temperature
        global_feat, patches = self.encode_image(pixels)
        pair = torch.stack([text[0], abnormal_feature(text)])
        g = self.geometry["grid"]
        probs = patch_class_probs(patches, text, inv_tau)  # (L, B, g*g, C)
        probs = probs.transpose(2, 3).reshape(len(patches), pixels.shape[0], text.shape[0], g, g)
        return {
            "image_logits": similarity_logits(global_feat, pair, inv_tau),
            "type_logits": similarity_logits(global_feat, text, inv_tau),
            "patch_probs": probs,
        }


def upsample_probs(probs: torch.Tensor, size: int) -> torch.Tensor:
    """(..., C, g, g) -> (..., C, size, size), bilinear with align_corners as in METHOD.md."""
    lead = probs.shape[:-3]
    flat = probs.reshape(-1, *probs.shape[-3:])
    up = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=True)
    return up.reshape(*lead, *up.shape[1:])
