"""The training-free baseline's text features against an independent ensemble of `encode_text`.

The reference builds every prompt string itself (state x template, object and defect word filled
in here), encodes them with plain OpenCLIP `encode_text`, and ensembles them with the rule in
`reference_ensemble` (the one place to change if the ensemble rule changes, see METHOD.md).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from training.prompts import (
    HANDCRAFTED_ABNORMAL_STATES,
    HANDCRAFTED_NORMAL_STATES,
    HANDCRAFTED_TEMPLATES,
    handcrafted_text_features,
)

WORDS = ["scratch", "hole", "crack"]


def reference_ensemble(features: torch.Tensor) -> torch.Tensor:
    """One class's feature from its prompts' projected features (P, D): the ensemble rule.

    Today's rule for the baseline: normalise each prompt's feature, average, normalise again.
    If the baseline moves to METHOD.md's rule (mean of the raw projected features, normalised
    once), change only this line: `return F.normalize(features.mean(0), dim=-1)`.
    """
    return F.normalize(F.normalize(features, dim=-1).mean(0), dim=-1)


def prompts(states: list[str]) -> list[str]:
    return [template.format(state) for state in states for template in HANDCRAFTED_TEMPLATES]


def normal_prompts(obj: str) -> list[str]:
    return prompts([s.format(obj) for s in HANDCRAFTED_NORMAL_STATES])


def defect_prompts(obj: str, word: str) -> list[str]:
    return prompts([s.format(obj, d=word) for s in HANDCRAFTED_ABNORMAL_STATES])


@torch.no_grad()
def reference_features(clip, tokenizer, texts: list[str]) -> torch.Tensor:
    return reference_ensemble(clip.encode_text(tokenizer(texts)))


def test_reference_prompts_say_what_they_should():
    normal = normal_prompts("object")
    assert len(normal) == len(HANDCRAFTED_NORMAL_STATES) * len(HANDCRAFTED_TEMPLATES)
    assert "a photo of a flawless object." in normal and not any("scratch" in t for t in normal)
    scratch = defect_prompts("object", "scratch")
    assert all("scratch" in t and "object" in t for t in scratch)
    assert "a photo of a object with scratch." in scratch


@torch.no_grad()
def test_every_row_equals_an_independent_ensemble_of_encode_text(tiny_model):
    clip, tokenizer = tiny_model.clip, tiny_model.text_prompts.tokenizer
    got = handcrafted_text_features(clip, tokenizer, WORDS)
    assert got.shape == (1 + len(WORDS), clip.text_projection.shape[1])
    torch.testing.assert_close(got[0], reference_features(clip, tokenizer, normal_prompts("object")),
                               rtol=0, atol=1e-5)
    for k, word in enumerate(WORDS, start=1):
        torch.testing.assert_close(got[k], reference_features(clip, tokenizer, defect_prompts("object", word)),
                                   rtol=0, atol=1e-5, msg=word)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got)), rtol=0, atol=1e-5)


@torch.no_grad()
def test_defect_rows_differ_from_normal_and_from_each_other(tiny_model):
    """Rule-independent: no two classes share a feature (a defect built from the normal states,
    or every defect from one word, would make rows equal)."""
    got = handcrafted_text_features(tiny_model.clip, tiny_model.text_prompts.tokenizer, WORDS)
    for i, j in itertools.combinations(range(len(got)), 2):
        assert (got[i] - got[j]).abs().max() > 1e-3, (i, j)


@torch.no_grad()
def test_the_object_word_reaches_every_prompt(tiny_model):
    clip, tokenizer = tiny_model.clip, tiny_model.text_prompts.tokenizer
    got = handcrafted_text_features(clip, tokenizer, ["hole"], obj="bottle")
    torch.testing.assert_close(got[0], reference_features(clip, tokenizer, normal_prompts("bottle")),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], reference_features(clip, tokenizer, defect_prompts("bottle", "hole")),
                               rtol=0, atol=1e-5)
    assert (got - handcrafted_text_features(clip, tokenizer, ["hole"])).abs().max() > 1e-3


def test_word_order_follows_the_vocabulary(tiny_model):
    clip, tokenizer = tiny_model.clip, tiny_model.text_prompts.tokenizer
    a = handcrafted_text_features(clip, tokenizer, ["scratch", "hole"])
    b = handcrafted_text_features(clip, tokenizer, ["hole", "scratch"])
    torch.testing.assert_close(a[[0, 2, 1]], b, rtol=0, atol=1e-6)
    assert (a[1:] - b[1:]).abs().max() > 1e-3  # ... and the rows are not interchangeable
