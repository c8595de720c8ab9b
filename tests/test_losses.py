"""DAPO's loss terms against hand-computed values."""
from __future__ import annotations

import math

import torch

from training.losses import dapo_loss, dice_loss, focal_loss


def test_focal_on_hand_made_probabilities():
    # two pixels, classes (normal, scratch): p_t = 0.5 and 0.9
    probs = torch.tensor([[[[0.5, 0.1]], [[0.5, 0.9]]]])  # (B=1, C=2, H=1, W=2)
    target = torch.tensor([[[0, 1]]])
    expected = ((0.5 ** 2) * math.log(2) + (0.1 ** 2) * -math.log(0.9)) / 2
    assert abs(float(focal_loss(probs, target)) - expected) < 1e-6


def test_focal_skips_ignored_pixels():
    probs = torch.tensor([[[[0.5, 0.01]], [[0.5, 0.99]]]])
    target = torch.tensor([[[0, -100]]])
    assert abs(float(focal_loss(probs, target)) - 0.25 * math.log(2)) < 1e-6
    assert float(focal_loss(probs, torch.full((1, 1, 2), -100))) == 0.0


def test_dice_perfect_and_disjoint():
    a = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert float(dice_loss(a, a)) < 1e-5
    assert abs(float(dice_loss(a, 1 - a)) - 1.0) < 1e-5
    # half overlap: pred 1 pixel, truth 2 pixels with 1 shared -> dice = 2*1 / 3
    truth = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert abs(float(dice_loss(a, truth)) - (1 - 2 / 3)) < 1e-5


def test_total_weights_and_images_without_masks():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1])
    probs = torch.full((2, 2, 3, 4, 4), 1 / 3)  # L=2 layers, B=2, C=3
    mask = torch.zeros(2, 4, 4, dtype=torch.long)
    mask[1, :2] = 2
    none = dapo_loss(logits, labels, probs, mask, torch.tensor([False, False]))
    ce = float(torch.nn.functional.cross_entropy(logits, labels))
    assert abs(float(none["loss"]) - ce) < 1e-6 and float(none["focal"]) == 0.0
    full = dapo_loss(logits, labels, probs, mask, torch.tensor([True, True]))
    pixel = float(full["focal"] + full["dice_normal"] + full["dice_abnormal"])
    assert abs(float(full["loss"]) - (ce + 4 * pixel)) < 1e-5
    # focal per layer: every pixel p_t = 1/3 -> (2/3)^2 * ln 3, summed over 2 layers
    assert abs(float(full["focal"]) - 2 * (2 / 3) ** 2 * math.log(3)) < 1e-5
