"""Import a `.pth` written by the authors' training script into our checkpoint format.

The file's layout is METHOD.md's "The authors' checkpoint format": a plain dict with three state
dicts (prompt learner, visual prompt, linear adapter; an older naming of the three is accepted
too), `epoch`, the optimiser state and possibly free-form extras. What it holds maps onto our
learned parameters one to one:

    prompt_learner.learnable_normal_tokens    (E, n, text width)  -> text_prompts.ctx_normal
    prompt_learner.learnable_abnormal_tokens  (E, n, text width)  -> text_prompts.ctx_abnormal
    prompt_learner.learnable_layer_tokens.i   (4, text width)     -> text_prompts.deep[i], i < D
    visual_prompt.learnable_visual_tokens     (depth, 4, width)   -> visual_prompts.tokens
    linear_adapter.fc.k.weight / .bias                            -> visual_prompts.adapters.k

`prompt_learner.meta_net.*` (an MLP the method does not use at inference) and
`optimizer_state_dict` are skipped and reported as such. E, n, the deep text depth D and the
token counts are read off the file; the widths and the visual depth must match the backbone,
otherwise the import stops with the file, the tensor and both shapes. The model serves in text
mode `reference`, the authors' inference (METHOD.md).

Loading uses `torch.load(weights_only=True)`: tensors and plain containers only, no code runs.
"""
from __future__ import annotations

import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.runtime.artifact import sha256_file
from training.backbone import BackboneSpec, create_clip, default_taps, describe
from training.checkpoint import load_learned, save_checkpoint
from training.data.vocab import defect_words
from training.model import DapoConfig, DapoModel

# our role -> the accepted top-level names, the current naming first
SECTIONS: dict[str, tuple[str, ...]] = {
    "prompt_learner": ("prompt_learner", "prompt_learner_state_dict"),
    "visual_prompt": ("visual_prompt", "visual_prompt_state_dict"),
    "linear_adapter": ("linear_adapter", "trainable_adapter_state_dict"),
}
UNUSED_ENTRIES = ("optimizer_state_dict",)  # top level: training state, not needed to serve
UNUSED_PROMPT_KEYS = re.compile(r"^meta_net\.")  # the prompt learner's MLP, unused at inference
LAYER_TOKENS = re.compile(r"^learnable_layer_tokens\.(\d+)$")
ADAPTER = re.compile(r"^fc\.(\d+)\.(weight|bias)$")


class AuthorsCheckpointError(ValueError):
    """The file is not a usable authors' checkpoint, or does not fit the backbone."""


@dataclass
class AuthorsCheckpoint:
    """The tensors of one authors' `.pth`, named by role, with what was skipped."""

    path: Path
    sha256: str
    epoch: int | None
    normal: torch.Tensor  # (E, n, text width)
    abnormal: torch.Tensor  # (E, n, text width)
    layer_tokens: list[torch.Tensor]  # D x (tokens, text width)
    visual_tokens: torch.Tensor  # (visual depth, tokens, width)
    adapters: list[tuple[torch.Tensor, torch.Tensor]]  # per tap: weight (embed, width), bias (embed,)
    sections: dict[str, str]  # role -> the top-level name found in the file
    ignored: list[str] = field(default_factory=list)  # entries skipped: unused by the method
    extra: list[str] = field(default_factory=list)  # other top-level entries (free-form training info)


@dataclass
class ImportOptions:
    """What the file does not say: the frozen backbone, the tapped layers and the vocabulary."""

    backbone: BackboneSpec
    vocabulary: list[str]
    taps: list[int] | None = None  # 1-based; None = quarters of the vision depth, like training


def _fail(path: Path, message: str) -> AuthorsCheckpointError:
    return AuthorsCheckpointError(f"{path}: {message}")


def _section(raw: dict, role: str, path: Path) -> tuple[str, dict]:
    found = [name for name in SECTIONS[role] if name in raw]
    if not found:
        raise _fail(path, f"no {' or '.join(repr(n) for n in SECTIONS[role])} state dict; top-level entries: "
                          f"{sorted(map(str, raw))}")
    if len(found) > 1:
        raise _fail(path, f"both {found[0]!r} and {found[1]!r} present; which one to serve is ambiguous")
    sd = raw[found[0]]
    if not isinstance(sd, dict):
        raise _fail(path, f"{found[0]!r} is a {type(sd).__name__}, not a state dict")
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise _fail(path, f"{found[0]}.{key} is a {type(value).__name__}, not a tensor")
    return found[0], sd


def _tensor(sd: dict, section: str, key: str, path: Path) -> torch.Tensor:
    if key not in sd:
        raise _fail(path, f"{section}.{key} missing; {section} holds {sorted(sd)}")
    return sd[key].detach().float()


def _numbered(found: dict[int, object], what: str, path: Path) -> list:
    """Values of keys .0 .. .N-1, refusing gaps."""
    if sorted(found) != list(range(len(found))):
        raise _fail(path, f"{what} indices {sorted(found)} are not 0..{len(found) - 1}")
    return [found[i] for i in range(len(found))]


def read_authors_checkpoint(path: str | Path) -> AuthorsCheckpoint:
    """Load and sort the file's entries; no backbone is needed yet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such authors' checkpoint")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # not a torch file, or objects we do not run
        raise _fail(path, f"cannot be read with torch.load(weights_only=True): {e}") from e
    if not isinstance(raw, dict):
        raise _fail(path, f"expected a dict of state dicts, found a {type(raw).__name__}")
    names: dict[str, str] = {}
    ignored = [e for e in UNUSED_ENTRIES if e in raw]

    names["prompt_learner"], pl = _section(raw, "prompt_learner", path)
    layers: dict[int, torch.Tensor] = {}
    for key, value in pl.items():
        m = LAYER_TOKENS.match(key)
        if m:
            layers[int(m.group(1))] = value.detach().float()
        elif UNUSED_PROMPT_KEYS.match(key):
            ignored.append(f"{names['prompt_learner']}.{key}")
        elif key not in ("learnable_normal_tokens", "learnable_abnormal_tokens"):
            raise _fail(path, f"unknown entry {names['prompt_learner']}.{key}")

    names["visual_prompt"], vp = _section(raw, "visual_prompt", path)
    unknown = sorted(set(vp) - {"learnable_visual_tokens"})
    if unknown:
        raise _fail(path, f"unknown entry {names['visual_prompt']}.{unknown[0]}")

    names["linear_adapter"], la = _section(raw, "linear_adapter", path)
    adapters: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in la.items():
        m = ADAPTER.match(key)
        if not m:
            raise _fail(path, f"unknown entry {names['linear_adapter']}.{key}")
        adapters.setdefault(int(m.group(1)), {})[m.group(2)] = value.detach().float()
    pairs = []
    for k, wb in enumerate(_numbered(adapters, f"{names['linear_adapter']}.fc", path)):
        if set(wb) != {"weight", "bias"}:
            raise _fail(path, f"{names['linear_adapter']}.fc.{k} lacks its {'bias' if 'weight' in wb else 'weight'}")
        pairs.append((wb["weight"], wb["bias"]))

    epoch = raw.get("epoch")
    return AuthorsCheckpoint(
        path=path, sha256=sha256_file(path), epoch=int(epoch) if isinstance(epoch, (int, float)) else None,
        normal=_tensor(pl, names["prompt_learner"], "learnable_normal_tokens", path),
        abnormal=_tensor(pl, names["prompt_learner"], "learnable_abnormal_tokens", path),
        layer_tokens=_numbered(layers, f"{names['prompt_learner']}.learnable_layer_tokens", path),
        visual_tokens=_tensor(vp, names["visual_prompt"], "learnable_visual_tokens", path),
        adapters=pairs, sections=names, ignored=ignored,
        extra=sorted(str(k) for k in raw if k not in {"epoch", *UNUSED_ENTRIES, *names.values()}),
    )


def _expect(ck: AuthorsCheckpoint, name: str, have: tuple[int, ...], need: tuple[int, ...], why: str) -> None:
    if tuple(have) != tuple(need):
        raise _fail(ck.path, f"{name} has shape {tuple(have)}, the backbone needs {tuple(need)} ({why})")


def check_fits(ck: AuthorsCheckpoint, geometry: dict, taps: list[int], backbone: str) -> None:
    """Refuse a width or depth the backbone does not have, naming the tensor and both shapes."""
    pl, vp, la = (ck.sections[r] for r in ("prompt_learner", "visual_prompt", "linear_adapter"))
    tw, vw, emb = geometry["text_width"], geometry["width"], geometry["embed_dim"]
    of = f"backbone {backbone}"
    if ck.normal.dim() != 3:
        raise _fail(ck.path, f"{pl}.learnable_normal_tokens has shape {tuple(ck.normal.shape)}, "
                             f"expected (prompt sets, context tokens, text width)")
    e, n, _ = ck.normal.shape
    _expect(ck, f"{pl}.learnable_normal_tokens", ck.normal.shape, (e, n, tw), f"{of}: text width {tw}")
    _expect(ck, f"{pl}.learnable_abnormal_tokens", ck.abnormal.shape, (e, n, tw),
            f"{of}: text width {tw}, as many sets and tokens as the normal ones")
    depth = len(ck.layer_tokens)
    if depth > geometry["text_layers"]:
        have = (depth, *ck.layer_tokens[0].shape)
        _expect(ck, f"{pl}.learnable_layer_tokens.0..{depth - 1} (stacked)", have,
                (geometry["text_layers"], *have[1:]), f"{of}: at most {geometry['text_layers']} text layers")
    slots = ck.layer_tokens[0].shape[0] if ck.layer_tokens and ck.layer_tokens[0].dim() == 2 else -1
    for i, tok in enumerate(ck.layer_tokens):
        _expect(ck, f"{pl}.learnable_layer_tokens.{i}", tok.shape, (slots, tw),
                f"{of}: (tokens, text width {tw}), the same for every layer")
    v = ck.visual_tokens
    tokens = v.shape[1] if v.dim() == 3 else -1
    _expect(ck, f"{vp}.learnable_visual_tokens", v.shape, (geometry["layers"], tokens, vw),
            f"{of}: one set per vision layer ({geometry['layers']}), vision width {vw}")
    if len(ck.adapters) != len(taps):
        raise _fail(ck.path, f"{len(ck.adapters)} adapters ({la}.fc.0..{len(ck.adapters) - 1}), but {len(taps)} "
                             f"tapped layers {taps}; pass --taps with {len(ck.adapters)} layers")
    for k, (w, b) in enumerate(ck.adapters):
        _expect(ck, f"{la}.fc.{k}.weight", w.shape, (emb, vw), f"{of}: embed dim {emb} x vision width {vw}")
        _expect(ck, f"{la}.fc.{k}.bias", b.shape, (emb,), f"{of}: embed dim {emb}")


def import_authors(path: str | Path, options: ImportOptions) -> tuple[DapoModel, AuthorsCheckpoint]:
    """A DapoModel (text mode `reference`) holding the file's learned tensors."""
    ck = read_authors_checkpoint(path)
    clip, tokenizer = create_clip(options.backbone)
    geometry = describe(clip)
    taps = list(options.taps) if options.taps else default_taps(geometry["layers"])
    check_fits(ck, geometry, taps, options.backbone.name)
    e, n, _ = ck.normal.shape
    config = DapoConfig(
        backbone=options.backbone, taps=taps, n_ctx=n, n_sets=e,
        text_deep_tokens=ck.layer_tokens[0].shape[0] if ck.layer_tokens else 0,
        text_deep_layers=len(ck.layer_tokens), visual_deep_tokens=ck.visual_tokens.shape[1],
        text_mode="reference",
    )
    model = DapoModel(config, clip, tokenizer)
    tensors = {
        "text_prompts.ctx_normal": ck.normal,
        "text_prompts.ctx_abnormal": ck.abnormal,
        "text_prompts.deep": torch.stack(ck.layer_tokens) if ck.layer_tokens
        else torch.zeros(0, 0, geometry["text_width"]),
        "visual_prompts.tokens": ck.visual_tokens,
        **{f"visual_prompts.adapters.{k}.{p}": t for k, pair in enumerate(ck.adapters)
           for p, t in zip(("weight", "bias"), pair)},
    }
    load_learned(model, tensors, strict=True, source=str(ck.path))
    return model, ck


def provenance(ck: AuthorsCheckpoint) -> dict:
    """Where an imported checkpoint came from: recorded in its config and in baked manifests."""
    return {"format": "authors-pth", "file": str(ck.path.resolve()), "sha256": ck.sha256, "epoch": ck.epoch,
            "sections": ck.sections, "ignored": ck.ignored, "extra": ck.extra}


def import_to_checkpoint(path: str | Path, options: ImportOptions, out: str | Path,
                         overwrite: bool = False) -> tuple[Path, AuthorsCheckpoint]:
    """`dapo import-authors`: the authors' .pth -> our safetensors checkpoint folder at `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace its checkpoint")
    words = list(defect_words(options.vocabulary))
    if not words:
        raise ValueError("the defect vocabulary is empty (--vocab)")
    spec = options.backbone
    if spec.pretrained and Path(spec.pretrained).is_file():  # bake may run from another folder
        spec = BackboneSpec(**{**spec.to_dict(), "pretrained": str(Path(spec.pretrained).resolve())})
    model, ck = import_authors(path, ImportOptions(spec, words, options.taps))
    if out.exists():  # only now that the import succeeded; no stale file of an earlier checkpoint stays
        shutil.rmtree(out)
    folder = save_checkpoint(model, out, vocabulary=words, epoch=ck.epoch, provenance=provenance(ck))
    return folder, ck
