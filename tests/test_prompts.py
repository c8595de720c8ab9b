"""The prompt words, the ensemble, the progressive blend, partial depths and the two text modes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.prompts import PROMPT_WORDS, HybridTextPrompts, blend, encode_text_deep, run_deep_layers

X = "x</w>"  # the placeholder's token: replaced by a learned context token


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


@pytest.mark.parametrize("mode", ["fixed", "reference"])
def test_prompt_token_sequences_are_pinned(tiny_model, mode):
    """METHOD.md's words, token by token (OpenCLIP's tokenizer): no period, nothing else."""
    tp = tiny_model.text_prompts
    tp.mode = mode
    try:
        tokens = tp._tokens(["scratch", "faulty imprint"], torch.device("cpu"))
    finally:
        tp.mode = "fixed"
    decoder = tp.tokenizer.decoder
    seqs = [[decoder[int(t)] for t in row[: int(row.argmax()) + 1]] for row in tokens]
    assert seqs == [
        ["<start_of_text>", X, X, X, X, X, "flawless</w>", "object</w>", "<end_of_text>"],
        ["<start_of_text>", X, X, X, X, X, "scratch</w>", "anomaly</w>", "object</w>", "<end_of_text>"],
        ["<start_of_text>", X, X, X, X, X, "faulty</w>", "imprint</w>", "anomaly</w>", "object</w>",
         "<end_of_text>"],
    ]
    assert tokens.shape[1] == 77 and (tokens[:, 11:] == 0).all()  # padding after end-of-text
    assert PROMPT_WORDS.texts(["hole"], 2) == ["X X flawless object", "X X hole anomaly object"]


def _raw_set_features(model, words, mode) -> torch.Tensor:
    """(E, 1 + K, D): each prompt set encoded on its own, projected, not normalised."""
    tp = model.text_prompts
    tokens = tp._tokens(words, torch.device("cpu"))
    base = model.clip.token_embedding(tokens)
    n = tp.n_ctx
    out = []
    for e in range(tp.ctx_normal.shape[0]):
        ctx = torch.cat([tp.ctx_normal[e:e + 1], tp.ctx_abnormal[e:e + 1].expand(len(words), -1, -1)])
        embeds = torch.cat([base[:, :1], ctx, base[:, 1 + n:]], dim=1)
        out.append(encode_text_deep(model.clip, tokens, embeds, tp.deep, tp.alpha, mode))
    return torch.stack(out)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["fixed", "reference"])
def test_ensemble_means_raw_projected_features_then_normalises_once(tiny_model, mode):
    words = ["scratch", "hole"]
    raw = _raw_set_features(tiny_model, words, mode)
    tiny_model.text_prompts.mode = mode
    try:
        ours = tiny_model.text_features(words)
    finally:
        tiny_model.text_prompts.mode = "fixed"
    torch.testing.assert_close(ours, F.normalize(raw.mean(0), dim=-1), rtol=0, atol=1e-6)
    # the other order (normalise each set first) is measurably different on these weights
    assert (ours - F.normalize(F.normalize(raw, dim=-1).mean(0), dim=-1)).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("mode,depth", [("reference", 2), ("fixed", 2), ("reference", 4), ("fixed", 4)])
def test_partial_depth_schedule(tiny_model, mode, depth):
    """METHOD.md "Partial depths" on the real text tower (4 layers): what each layer sees."""
    clip = tiny_model.clip
    blocks = clip.transformer.resblocks
    g = torch.Generator().manual_seed(1)
    deep = torch.randn((depth, 4, clip.transformer.width), generator=g)
    tokens, embeds = _tokens_and_embeds(tiny_model, ["hole"])
    seen_in, seen_out = [], []
    hooks = [b.register_forward_pre_hook(lambda m, args, kw: seen_in.append(args[0].clone()), with_kwargs=True)
             for b in blocks] + [b.register_forward_hook(lambda m, i, o: seen_out.append(o.clone())) for b in blocks]
    hooks.append(clip.ln_final.register_forward_hook(lambda m, i, o: seen_out.append(o.clone())))
    try:
        encode_text_deep(clip, tokens, embeds, deep, 0.01, mode)
    finally:
        for h in hooks:
            h.remove()
    lengths = [x.shape[1] for x in seen_in]
    final = seen_out[-1].shape[1]
    if depth < len(blocks):  # in before 0, blended before 1..D-1, through layer D unblended, out after it
        assert lengths == [81] * (depth + 1) + [77] * (len(blocks) - depth - 1) and final == 77
        torch.testing.assert_close(seen_in[depth][:, 1:5], seen_out[depth - 1][:, 1:5])  # not blended
    else:  # D == depth: never dropped in reference (pooled 4 short), dropped after the last layer in fixed
        assert lengths == [81] * len(blocks) and final == (81 if mode == "reference" else 77)
    torch.testing.assert_close(seen_in[0][:, 1:5], deep[0].expand(len(tokens), -1, -1))
    for i in range(1, depth):
        torch.testing.assert_close(seen_in[i][:, 1:5], 0.01 * seen_out[i - 1][:, 1:5] + 0.99 * deep[i])


def test_context_and_deep_tokens_start_from_token_embedding_statistics(tiny_model):
    """Both are per-dimension mean + std * N(0, 1) of CLIP's token-embedding table."""
    clip = copy.deepcopy(tiny_model.clip)
    g = torch.Generator().manual_seed(0)
    width = clip.transformer.width
    mean, std = torch.linspace(-2, 2, width), torch.linspace(0.1, 0.5, width)
    with torch.no_grad():
        clip.token_embedding.weight.copy_(mean + std * torch.randn(clip.token_embedding.weight.shape, generator=g))
    tp = HybridTextPrompts(clip, tiny_model.text_prompts.tokenizer, n_sets=10, deep_tokens=16)
    for p in (tp.ctx_normal, tp.deep):
        rows = p.detach().reshape(-1, width)  # 50 and 64 samples per dimension
        assert ((rows.mean(0) - mean).abs() < 4 * std / rows.shape[0] ** 0.5).all()
        assert ((rows.std(0) / std - 1).abs() < 0.5).all()
