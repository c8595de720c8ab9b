"""The text side of DAPO: hybrid defect-aware prompts, deep text prompts, text encoding.

Prompts are hybrid: learned context tokens followed by fixed words, one of which is the defect
word. Because the defect word stays plain text, a type never seen in training is added by
writing its name and re-baking (the paper's zero-shot promise).

    normal:    [V1..Vn] flawless object             (V: one set per prompt set e)
    abnormal:  [W1..Wn] <defect> anomaly object     (W: shared by every defect type)

The fixed words are exactly METHOD.md's (no trailing period: a period is one more token and
moves every text feature). Each class's feature is the mean of its E prompt sets' projected
features, normalised once.

Deep text prompts: D sets of learned tokens (D <= the text tower's depth), inserted after the
start token before layer 0, blended before layers 1..D-1, carried through layer D unblended and
dropped right after it (METHOD.md, "Partial depths").

Two text-encoding modes:
- ``fixed`` (default): CLIP's causal mask kept; the slots are always dropped (at the latest
  after the last layer), so pooling happens at the real end-of-text token.
- ``reference``: reproduces the authors' prototype so that their checkpoints serve the same:
  no causal mask; when D equals the tower's depth the slots are never dropped and pooling
  happens at the template's end-of-text index (4 positions before the real end-of-text token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

TextMode = Literal["fixed", "reference"]


@dataclass(frozen=True)
class PromptWords:
    """The fixed words of the hybrid prompts; `placeholder` marks each learned context token
    in the text handed to the tokenizer (its embedding is replaced by the learned one)."""

    normal: str = "flawless object"
    abnormal: str = "{defect} anomaly object"
    placeholder: str = "X"

    def texts(self, words: list[str], n_ctx: int) -> list[str]:
        """Normal prompt first, then one abnormal prompt per defect word."""
        ctx = " ".join([self.placeholder] * n_ctx)
        return [f"{ctx} {self.normal}"] + [f"{ctx} {self.abnormal.format(defect=w)}" for w in words]


PROMPT_WORDS = PromptWords()

# Training-free baseline (WinCLIP/AnomalyCLIP-style state x template ensembles).
HANDCRAFTED_NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}",
                             "{} without flaw", "{} without defect", "{} without damage"]
HANDCRAFTED_ABNORMAL_STATES = ["{} with {d}", "{} with a {d}", "{} with {d} defect",
                               "damaged {} with {d}", "{d} on the {}", "{} showing {d}"]
HANDCRAFTED_TEMPLATES = ["a photo of a {}.", "a cropped photo of the {}.", "a close-up photo of a {}.",
                         "a bright photo of a {}.", "a dark photo of the {}.", "a photo of the {} for inspection.",
                         "a photo of a {} for anomaly detection.", "an industrial photo of a {}."]


def blend(prev_slots: torch.Tensor, own: torch.Tensor, alpha: float) -> torch.Tensor:
    """DAPO's progressive rule: alpha * previous layer's slot outputs + (1 - alpha) * own tokens."""
    return alpha * prev_slots + (1.0 - alpha) * own


def run_deep_layers(blocks: nn.ModuleList, x: torch.Tensor, deep: torch.Tensor, alpha: float, *,
                    causal: bool = False, drop_after: int | None = None,
                    taps: set[int] | frozenset = frozenset()):
    """Run transformer blocks over x = [first token, slots, rest], blending slots between layers.

    x already holds deep[0] in positions 1..n. Before each layer i in 1..len(deep)-1 the slots
    become blend(their previous output, deep[i]); past len(deep) they run on unblended. With
    `drop_after` = i the slots leave the sequence right after layer i (0-based), so the later
    layers see the template's positions again. `causal` applies CLIP's text mask, sized to the
    sequence as it is at each layer. Returns the final x and the outputs of the 1-based block
    indices in `taps`. Shared by the text and the vision side.
    """
    n = deep.shape[1]
    tapped = []
    for i, block in enumerate(blocks):
        if 0 < i < deep.shape[0] and n:
            slots = blend(x[:, 1:1 + n], deep[i].unsqueeze(0).to(x.dtype), alpha)
            x = torch.cat([x[:, :1], slots, x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=causal_mask(x.shape[1], x.device) if causal else None)
        if i == drop_after and n:
            x = remove_slots(x, n)
            n = 0
        if i + 1 in taps:
            tapped.append(x)
    return x, tapped


def remove_slots(x: torch.Tensor, n: int) -> torch.Tensor:
    """Drop the n prompt slots that follow the first token."""
    return torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)


def insert_slots(x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Insert layer-0 deep tokens (n, w) right after the first (start / class) token."""
    return torch.cat([x[:, :1], first.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1:]], dim=1)


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.full((length, length), float("-inf"), device=device).triu_(1)


def slot_drop_layer(depth: int, tower_depth: int, mode: TextMode) -> int | None:
    """The 0-based layer after which the deep text slots leave the sequence (None: never).

    METHOD.md: the slots pass through layer D once more unblended and are dropped right after
    it; with D equal to the tower's depth the authors never drop them (`reference` keeps that),
    while `fixed` drops them after the last layer so pooling sees the template's positions."""
    if depth < tower_depth:
        return depth
    return None if mode == "reference" else tower_depth - 1


def encode_text_deep(clip: nn.Module, tokens: torch.Tensor, embeds: torch.Tensor, deep: torch.Tensor,
                     alpha: float, mode: TextMode) -> torch.Tensor:
    """Encode token embeddings (P, L, w) with deep prompts (D, n, w); returns the projected,
    unnormalised features (P, E) pooled at the template's end-of-text index."""
    n = deep.shape[1] if deep.shape[0] else 0
    blocks = clip.transformer.resblocks
    if deep.shape[0] > len(blocks):
        raise ValueError(f"{deep.shape[0]} deep text layers, but the text tower has {len(blocks)}")
    x = embeds + clip.positional_embedding.to(embeds.dtype)
    x = insert_slots(x, deep[0]) if n else x
    x, _ = run_deep_layers(blocks, x, deep, alpha, causal=mode == "fixed",
                           drop_after=slot_drop_layer(deep.shape[0], len(blocks), mode))
    x = clip.ln_final(x)
    eot = tokens.argmax(dim=-1)  # end-of-text has the largest id; 4 short if the slots are still in
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = clip.text_projection
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def token_stats_init(clip: nn.Module, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Context init from CLIP's token-embedding table: per-dimension mean + std * N(0, 1)."""
    table = clip.token_embedding.weight.detach().float()
    noise = torch.randn(shape, generator=generator)
    return table.mean(0) + table.std(0) * noise


class HybridTextPrompts(nn.Module):
    """Learned context (E sets x normal/abnormal) and deep text tokens; encodes a vocabulary.

    depth: number of deep text token sets D (None = the text tower's depth)."""

    def __init__(self, clip: nn.Module, tokenizer, n_ctx: int = 5, n_sets: int = 10, deep_tokens: int = 4,
                 alpha: float = 0.01, mode: TextMode = "fixed", seed: int = 0, depth: int | None = None):
        super().__init__()
        width = clip.transformer.width
        layers = clip.transformer.layers
        depth = layers if depth is None else depth
        if not 0 <= depth <= layers:
            raise ValueError(f"deep text depth {depth} outside 0..{layers} (the text tower's depth)")
        g = torch.Generator().manual_seed(seed)
        self.ctx_normal = nn.Parameter(token_stats_init(clip, (n_sets, n_ctx, width), g))
        self.ctx_abnormal = nn.Parameter(token_stats_init(clip, (n_sets, n_ctx, width), g))
        self.deep = nn.Parameter(token_stats_init(clip, (depth, deep_tokens, width), g))
        self.tokenizer = tokenizer
        self.alpha = alpha
        self.mode: TextMode = mode

    @property
    def n_ctx(self) -> int:
        return self.ctx_normal.shape[1]

    def _tokens(self, words: list[str], device: torch.device) -> torch.Tensor:
        return self.tokenizer(PROMPT_WORDS.texts(words, self.n_ctx)).to(device)

    def forward(self, clip: nn.Module, words: list[str]) -> torch.Tensor:
        """Text features (1 + K, D), L2-normalised: row 0 = normal, row k = words[k-1].

        Each row is the mean over the E prompt sets of the projected features, taken before
        normalisation, then normalised once (METHOD.md)."""
        if not words:
            raise ValueError("the defect vocabulary is empty")
        device = self.ctx_normal.device
        tokens = self._tokens(words, device)  # (1 + K, L)
        base = clip.token_embedding(tokens)  # (1 + K, L, w)
        n_sets, n = self.ctx_normal.shape[:2]
        ctx = torch.cat([self.ctx_normal.unsqueeze(1),
                         self.ctx_abnormal.unsqueeze(1).expand(-1, len(words), -1, -1)], dim=1)  # (E, 1+K, n, w)
        base = base.unsqueeze(0).expand(n_sets, -1, -1, -1)
        embeds = torch.cat([base[:, :, :1], ctx.to(base.dtype), base[:, :, 1 + n:]], dim=2)
        flat = embeds.reshape(-1, *embeds.shape[2:])
        flat_tokens = tokens.unsqueeze(0).expand(n_sets, -1, -1).reshape(-1, tokens.shape[-1])
        feats = encode_text_deep(clip, flat_tokens, flat, self.deep, self.alpha, self.mode)
        return F.normalize(feats.reshape(n_sets, len(words) + 1, -1).mean(0), dim=-1)


@torch.no_grad()
def handcrafted_text_features(clip: nn.Module, tokenizer, words: list[str], obj: str = "object") -> torch.Tensor:
    """Training-free text features (1 + K, D): state x template ensembles, averaged per class."""
    device = next(clip.parameters()).device

    def ensemble(states: list[str]) -> torch.Tensor:
        texts = [t.format(s) for s in states for t in HANDCRAFTED_TEMPLATES]
        f = F.normalize(clip.encode_text(tokenizer(texts).to(device)), dim=-1).mean(0)
        return F.normalize(f, dim=-1)

    normal = ensemble([s.format(obj) for s in HANDCRAFTED_NORMAL_STATES])
    types = [ensemble([s.format(obj, d=w) for s in HANDCRAFTED_ABNORMAL_STATES]) for w in words]
    return torch.stack([normal, *types])


def abnormal_feature(text_features: torch.Tensor) -> torch.Tensor:
    """t_Abar = normalise(mean of the normalised defect features t_1..t_K)."""
    return F.normalize(F.normalize(text_features[1:], dim=-1).mean(0), dim=-1)
