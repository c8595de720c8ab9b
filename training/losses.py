"""DAPO's training loss (METHOD.md):

    L = 1 * CE(image logits over [t_N, t_Abar], label)
      + 4 * sum over tapped layers of [ Focal(P_l, class mask; gamma=2)
                                      + Dice(P_l normal channel, 1 - binary mask)
                                      + Dice(sum of P_l defect channels, binary mask) ]

P_l are per-pixel class probabilities (already softmaxed) at the mask resolution. Pixels marked
``ignore_index`` are skipped by the focal term; images without a mask add only the image term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.data.common import IGNORE_INDEX

EPS = 1e-6


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean over valid pixels of -(1 - p_t)^gamma * log p_t; probs (B, C, H, W), target (B, H, W)."""
    valid = target != ignore_index
    if not valid.any():
        return probs.sum() * 0.0
    t = target.clamp(min=0).unsqueeze(1)
    p_t = probs.gather(1, t).squeeze(1).clamp(min=EPS, max=1.0)
    loss = -((1.0 - p_t) ** gamma) * torch.log(p_t)
    return loss[valid].mean()


def dice_loss(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """1 - Dice per image, averaged; pred and truth (B, H, W) in [0, 1]."""
    pred = pred.flatten(1)
    truth = truth.flatten(1)
    inter = (pred * truth).sum(1)
    dice = (2 * inter + EPS) / (pred.sum(1) + truth.sum(1) + EPS)
    return (1.0 - dice).mean()


def dapo_loss(image_logits: torch.Tensor, labels: torch.Tensor, layer_probs: torch.Tensor,
              class_mask: torch.Tensor, has_mask: torch.Tensor, image_weight: float = 1.0,
              pixel_weight: float = 4.0, gamma: float = 2.0) -> dict[str, torch.Tensor]:
    """All terms and the total. layer_probs (L, B, C, H, W); class_mask (B, H, W); has_mask (B,)."""
    image = F.cross_entropy(image_logits, labels)
    zero = image * 0.0
    focal, dice_n, dice_a = zero, zero, zero
    if has_mask.any():
        probs = layer_probs[:, has_mask]
        target = class_mask[has_mask]
        binary = (target != 0).float()
        for p in probs:
            focal = focal + focal_loss(p, target, gamma)
            dice_n = dice_n + dice_loss(p[:, 0], 1.0 - binary)
            dice_a = dice_a + dice_loss(p[:, 1:].sum(1), binary)
    total = image_weight * image + pixel_weight * (focal + dice_n + dice_a)
    return {"loss": total, "image": image, "focal": focal, "dice_normal": dice_n, "dice_abnormal": dice_a}
