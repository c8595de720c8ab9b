"""`dapo ensure-artifact`: make sure the artifact a node is about to serve exists and verifies.

Run once before the service starts (compose's one-shot `init` service), so `docker compose up`
works on a fresh node without anyone knowing about the bake step:

- a folder whose manifest and every file's sha256 verify is left alone (a restart costs one
  hash pass, no rebuild);
- a missing folder, or an empty one (what Docker leaves when it bind-mounts a path that did
  not exist), is built from the recipe named like the folder (`baseline`, `demo`); a folder
  with another name cannot be rebuilt from nothing and is reported as missing;
- a folder that exists but does not verify (truncated copy, edited file, a stranger's
  folder) is refused, naming the file: it is never silently replaced (`--force` rebuilds it
  when a recipe exists).

The build goes through `training.bake.bake`, which writes into a temporary sibling folder and
renames it into place only after the export verified, so a failed build (no network for the
weights, disk full, Ctrl-C) leaves nothing at the target. The real backbone's weights are
fetched *first*, before a ViT-L is instantiated, so a node without network fails within seconds
with a message that says what to do.

torch / OpenCLIP are imported only when something must be built; `add_arguments` / `main` are
what `service.cli`'s command table runs for `dapo ensure-artifact`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.runtime.artifact import ArtifactError, load_manifest

AUTO = "auto"
NONE = "none"


class ProvisionError(RuntimeError):
    """The artifact is not there and cannot be made here; the message says what to do."""


@dataclass(frozen=True)
class Recipe:
    """How to build one artifact from nothing (no checkpoint, no data)."""

    name: str
    summary: str
    build: Callable[[Path], object]  # writes the folder (atomically, via training.bake)


def _build_demo(out: Path) -> object:
    from training.bake import bake_demo

    return bake_demo(out, overwrite=True)


# The training-free baseline on the product's backbone: handcrafted prompts, no learned
# parameters, so it can be built anywhere the OpenAI weights can be downloaded.
BASELINE_BACKBONE = "ViT-L-14-336-quickgelu"
BASELINE_PRETRAINED = "openai"
BASELINE_IMAGE_SIZE = 518


def fetch_weights(backbone: str, pretrained: str) -> Path:
    """Download (or find in the cache) OpenCLIP's weights for backbone/pretrained.

    Done before the model is built: building ViT-L takes a minute on a CPU, and the download is
    the step that fails on an offline node."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(backbone, pretrained)
    if not cfg:
        raise ProvisionError(f"OpenCLIP has no weights {pretrained!r} for {backbone!r}")
    try:
        return Path(open_clip.download_pretrained(cfg))
    except (OSError, RuntimeError) as e:  # requests/HF hub errors are OSErrors; open_clip wraps some
        raise ProvisionError(_offline_advice(backbone, pretrained, e)) from e


def _offline_advice(backbone: str, pretrained: str, error: Exception) -> str:
    return (f"cannot download the {backbone}/{pretrained} weights ({error}). Either give this one-shot "
            "run network access to huggingface.co once (compose keeps the weights in the model-cache "
            "volume), or copy an artifact baked elsewhere into model_artifacts/<name> (the service "
            "verifies its sha256), or serve the offline demo: DAPO_ARTIFACT_NAME=demo docker compose up. "
            "Nothing was written.")


def _build_baseline(out: Path) -> object:
    fetch_weights(BASELINE_BACKBONE, BASELINE_PRETRAINED)  # first: the step an offline node fails
    from training.backbone import BackboneSpec
    from training.bake import DEMO_VOCAB, BakeOptions, bake
    from training.model import DapoConfig, DapoModel

    spec = BackboneSpec(name=BASELINE_BACKBONE, pretrained=BASELINE_PRETRAINED, image_size=BASELINE_IMAGE_SIZE)
    return bake(DapoModel(DapoConfig(backbone=spec)), list(DEMO_VOCAB), out, BakeOptions(
        name=out.name, prompts="handcrafted",
        description="Training-free baseline: handcrafted prompts on OpenAI CLIP ViT-L/14@336 at 518 px.",
        provenance={"kind": "baseline", "recipe": "ensure-artifact"}, overwrite=True))


RECIPES: dict[str, Recipe] = {
    "baseline": Recipe("baseline", f"handcrafted prompts on {BASELINE_BACKBONE}/{BASELINE_PRETRAINED} "
                                   f"at {BASELINE_IMAGE_SIZE} px (downloads the weights)", _build_baseline),
    "demo": Recipe("demo", "tiny random-weight ViT, plumbing only (offline, seconds)", _build_demo),
}


@dataclass(frozen=True)
class Outcome:
    """What ensure() did: `present` (verified, untouched) or `built`."""

    folder: Path
    action: str
    name: str
    version: str
    seconds: float

    def to_json(self) -> str:
        return json.dumps({"artifact": str(self.folder), "action": self.action, "name": self.name,
                           "version": self.version, "seconds": round(self.seconds, 3)})


def recipe_for(folder: Path, recipe: str = AUTO) -> Recipe | None:
    """The recipe to build `folder` with: named explicitly, or (auto) the one named like the folder."""
    if recipe == NONE:
        return None
    name = folder.name if recipe == AUTO else recipe
    if name in RECIPES:
        return RECIPES[name]
    if recipe == AUTO:
        return None
    raise ProvisionError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}, {AUTO}, {NONE}")


def _is_empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())


def _missing_message(folder: Path) -> str:
    return (f"no artifact at {folder} and no recipe to build one named {folder.name!r} "
            f"(recipes: {', '.join(RECIPES)}). Bake it first, e.g. `docker compose --profile bake run --rm bake "
            f"bake --checkpoint /runs/<run>/last --out /models/{folder.name}`, or copy it there.")


def _check_writable(parent: Path) -> None:
    """Fail before an expensive build when the result could not be put in place."""
    advice = (f"cannot write into {parent} as uid {os.getuid()}: give that folder to this user, or run as "
              "its owner (compose: DAPO_UID=$(id -u) DAPO_GID=$(id -g) docker compose up)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProvisionError(f"{advice} ({e})") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ProvisionError(advice)


def ensure(folder: str | Path, recipe: str = AUTO, force: bool = False) -> Outcome:
    """Leave a verified artifact at `folder`, building it from its recipe when it is missing."""
    folder = Path(folder)
    chosen = recipe_for(folder, recipe)
    t0 = time.perf_counter()
    if folder.exists() and not _is_empty_dir(folder):
        try:
            manifest = load_manifest(folder, verify=True)
        except ArtifactError as e:
            if not (force and chosen):
                hint = "--force rebuilds it from the recipe" if chosen else "bake or copy it again"
                raise ProvisionError(f"{e}. The folder is left as it is: move it away ({hint}).") from e
        else:
            if not force:
                return Outcome(folder, "present", manifest.name, manifest.version, time.perf_counter() - t0)
    if chosen is None:
        raise ProvisionError(_missing_message(folder))
    _check_writable(folder.parent)
    if _is_empty_dir(folder):
        folder.rmdir()  # an empty bind-mount leftover, not an artifact
    chosen.build(folder)
    manifest = load_manifest(folder, verify=True)
    return Outcome(folder, "built", manifest.name, manifest.version, time.perf_counter() - t0)


def describe_recipes() -> str:
    return "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values())


# --- `dapo ensure-artifact` (service.cli's command table names these) -------------------------
def add_arguments(a: argparse.ArgumentParser) -> None:
    a.description = ("Leave a verified artifact at FOLDER: a present one is sha256-verified and kept, a missing "
                     f"(or empty) one is built from its recipe, a corrupt one is refused. Recipes: {describe_recipes()}.")
    a.add_argument("folder", metavar="FOLDER")
    a.add_argument("--recipe", default=AUTO, choices=[AUTO, NONE, *RECIPES],
                   help="auto (default): the recipe named like FOLDER, if any; none: only verify")
    a.add_argument("--force", action="store_true", help="rebuild from the recipe even if present or corrupt")


def main(args: argparse.Namespace) -> int:
    """Compose's one-shot `init`: one JSON line on success; a message and status 1 otherwise."""
    try:
        outcome = ensure(args.folder, recipe=args.recipe, force=args.force)
    except ProvisionError as e:
        print(f"dapo ensure-artifact: {e}", file=sys.stderr)
        return 1
    except ImportError as e:  # only a build needs torch; a present artifact is only verified
        print(f"dapo ensure-artifact: building needs the training extra ({e.name} missing): "
              "pip install 'dapo-inspect[train,cpu]' (or run it in the train image)", file=sys.stderr)
        return 1
    print(outcome.to_json())
    return 0
