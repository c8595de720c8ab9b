"""The progressive blend and the two text modes (fixed vs the authors' reference)."""
from __future__ import annotations

import torch
from torch import nn

from training.prompts import blend, encode_text_deep, run_deep_layers


class AddOne(nn.Module):
    def forward(self, x, attn_mask=None):
        return x + 1.0


def test_blend_rule_on_hand_made_tensors():
    prev = torch.tensor([[10.0, 20.0]])
    own = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(blend(prev, own, 0.01), torch.tensor([[0.01 * 10 + 0.99 * 1, 0.01 * 20 + 0.99 * 2]]))


def test_slots_are_blended_between_layers_and_taps_returned():
    # x = [first, slot, rest]; deep tokens per layer: 0, 100, 200 (one slot, width 1)
    deep = torch.tensor([[[0.0]], [[100.0]], [[200.0]]])
    x = torch.tensor([[[5.0], [0.0], [7.0]]])
    out, taps = run_deep_layers(nn.ModuleList([AddOne(), AddOne(), AddOne()]), x, deep, alpha=0.01, taps={1, 3})
    # layer 1: slot 0 -> 1. layer 2: slot = .01*1 + .99*100 = 99.01 -> 100.01
    # layer 3: slot = .01*100.01 + .99*200 = 199.0001 -> 200.0001 ; non-slot tokens just +1 each layer
    torch.testing.assert_close(out, torch.tensor([[[8.0], [200.0001], [10.0]]]))
    assert len(taps) == 2
    torch.testing.assert_close(taps[0], torch.tensor([[[6.0], [1.0], [8.0]]]))


def _tokens_and_embeds(model, words):
    tp = model.text_prompts
    tokens = tp._tokens(words, torch.device("cpu"))
    return tokens, model.clip.token_embedding(tokens)


@torch.no_grad()
def test_fixed_mode_without_slots_is_plain_clip(tiny_model):
    clip = tiny_model.clip
    tokens, embeds = _tokens_and_embeds(tiny_model, ["scratch"])
    empty = torch.zeros(clip.transformer.layers, 0, clip.transformer.width)
    ours = encode_text_deep(clip, tokens, embeds, empty, 0.01, "fixed")
    torch.testing.assert_close(ours, clip.encode_text(tokens))


@torch.no_grad()
def test_fixed_is_causal_reference_is_not(tiny_model):
    """Fixed keeps CLIP's causal mask: tokens after end-of-text cannot change the feature."""
    clip, deep = tiny_model.clip, tiny_model.text_prompts.deep
    tokens, embeds = _tokens_and_embeds(tiny_model, ["scratch"])
    eot = int(tokens.argmax(-1).max())  # the latest end-of-text over the prompts
    changed = embeds.clone()
    changed[:, eot + 1:] += torch.randn_like(changed[:, eot + 1:])  # padding positions only
    for mode, same in (("fixed", True), ("reference", False)):
        a = encode_text_deep(clip, tokens, embeds, deep, 0.01, mode)
        b = encode_text_deep(clip, tokens, changed, deep, 0.01, mode)
        assert bool((a - b).abs().max() < 1e-4) is same, mode  # fixed: float noise only


@torch.no_grad()
def test_pooling_position_fixed_at_real_eot_reference_four_short(tiny_model):
    clip, deep = tiny_model.clip, tiny_model.text_prompts.deep
    tokens, embeds = _tokens_and_embeds(tiny_model, ["hole"])
    eot = tokens.argmax(-1)
    rows = torch.arange(len(tokens))
    seen = {}
    hook = clip.ln_final.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o))
    try:
        for mode in ("fixed", "reference"):
            feat = encode_text_deep(clip, tokens, embeds, deep, 0.01, mode)
            x = seen["x"]
            n = deep.shape[1]
            # fixed: slots removed -> 77 positions, token at eot is the real end-of-text
            # reference: 81 positions, index eot is 4 before the real end-of-text (at eot + 4)
            assert x.shape[1] == (77 if mode == "fixed" else 77 + n)
            torch.testing.assert_close(feat, x[rows, eot] @ clip.text_projection)
            if mode == "reference":
                assert not torch.allclose(feat, x[rows, eot + n] @ clip.text_projection, atol=1e-3)
    finally:
        hook.remove()


@torch.no_grad()
def test_modes_agree_on_nothing_else_changed(tiny_model):
    """Same parameters, different modes -> different features (the modes are not aliases)."""
    words = ["scratch", "hole"]
    tp = tiny_model.text_prompts
    fixed = tiny_model.text_features(words)
    tp.mode = "reference"
    try:
        ref = tiny_model.text_features(words)
    finally:
        tp.mode = "fixed"
    assert (fixed - ref).abs().max() > 1e-3
