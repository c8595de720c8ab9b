"""An authors' `.pth` -> `dapo import-authors` -> `dapo bake` -> served, scoring as their code does.

The file is written here with exactly the names and shapes of METHOD.md ("The authors'
checkpoint format") on a tiny random OpenCLIP config whose text, vision and embedding widths all
differ. The expected scores come from `AuthorsInference` below: an independent plain-torch
implementation of the authors' inference written from METHOD.md's facts alone (it reads the
authors' tensor names, uses open_clip's modules directly and nothing from `training/`):

- text: "[V1..Vn] flawless object" / "[W1..Wn] <defect> anomaly object", no period; deep text
  tokens inserted after the start token before layer 0, blended 0.01 / 0.99 before layers
  1..D-1, carried through layer D unblended and dropped right after it (never when D equals
  the tower's depth); no causal mask; pooled at the template's end-of-text index; each class
  the mean of the E sets' raw projected features, normalised once;
- vision: visual tokens after the class token, blended the same way, stripped from the tapped
  patch tokens, one Linear adapter per tap, L2 norm; global = ln_post(class token) @ proj;
- scoring (tau 0.07): image score softmax([t_N, t_Abar]); per-type softmax over [t_N, t_1..t_K];
  per-layer patch softmax over K+1 classes, bilinear upsampling with align_corners=True, layer
  sum; anomaly map = layer sum of the defect channels; type map = argmax of the layer sum.

The artifact reports layer *means* (METHOD.md: dividing the layer sum by the number of layers
keeps the ranking and gives [0, 1]); the comparison divides the reference's sums accordingly.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.numpy import load_file
from safetensors.torch import save_file

from service.server.app import create_app
from service.runtime.artifact import load_manifest
from service.runtime.backends import create_backend
from service.cli import main
from service.runtime.imaging import preprocess
from service.server.settings import Settings

TAU = 0.07
ALPHA = 0.01
ATOL = 1e-4
E, N_CTX, SLOTS = 3, 5, 4  # prompt sets (10 in the paper; fewer keeps the test fast), context tokens, slots
# text width 32 (4 layers), vision width 48 (3 layers), joint embedding 24: a width mix-up cannot pass
TINY = {"embed_dim": 24,
        "vision_cfg": {"image_size": 56, "layers": 3, "width": 48, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4}}
SIZE = TINY["vision_cfg"]["image_size"]
TEXT_DEPTH = TINY["text_cfg"]["layers"]
TAPS = [1, 2, 3]  # default_taps(3): the quarters of the depth
WORDS = ["scratch", "hole", "faulty imprint"]
OLD_NAMES = {"prompt_learner": "prompt_learner_state_dict", "visual_prompt": "visual_prompt_state_dict",
             "linear_adapter": "trainable_adapter_state_dict"}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny config JSON and its frozen random CLIP weights saved beside it (safetensors)."""
    root = tmp_path_factory.mktemp("backbone")
    config = root / "authors-tiny.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(7)
    clip = open_clip.create_model("authors-tiny", pretrained=None)
    weights = root / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    return config, weights


def authors_file(path: Path, depth: int, old_names: bool = False, seed: int = 0) -> dict:
    """A `.pth` as the authors' training script writes it (shared random weights), with
    meta_net, the optimiser state and a free-form extra entry."""
    g = torch.Generator().manual_seed(seed)
    tw, vw, emb = TINY["text_cfg"]["width"], TINY["vision_cfg"]["width"], TINY["embed_dim"]

    def rnd(*shape, scale=1.0):
        return torch.randn(shape, generator=g) * scale

    prompt_learner = {
        "learnable_normal_tokens": rnd(E, N_CTX, tw, scale=0.5),
        "learnable_abnormal_tokens": rnd(E, N_CTX, tw, scale=0.5),
        **{f"learnable_layer_tokens.{i}": rnd(SLOTS, tw, scale=0.5) for i in range(depth)},
        "meta_net.0.weight": rnd(emb // 4, emb), "meta_net.0.bias": rnd(emb // 4),
        "meta_net.2.weight": rnd(tw, emb // 4), "meta_net.2.bias": rnd(tw),
    }
    visual_prompt = {"learnable_visual_tokens": rnd(TINY["vision_cfg"]["layers"], SLOTS, vw, scale=0.1)}
    adapter = {}
    for k in range(len(TAPS)):
        adapter[f"fc.{k}.weight"] = rnd(emb, vw, scale=vw ** -0.5)
        adapter[f"fc.{k}.bias"] = rnd(emb, scale=0.1)
    names = OLD_NAMES if old_names else {k: k for k in OLD_NAMES}
    raw = {
        "epoch": 4,
        names["prompt_learner"]: prompt_learner,
        names["visual_prompt"]: visual_prompt,
        names["linear_adapter"]: adapter,
        "optimizer_state_dict": {"state": {0: {"step": torch.tensor(40.0), "exp_avg": rnd(3)}},
                                 "param_groups": [{"lr": 1e-3, "betas": (0.5, 0.999), "params": [0]}]},
        "training_info": {"dataset": "mvtec", "batch_size": 8},
    }
    torch.save(raw, path)
    return raw


class AuthorsInference:
    """The authors' inference from METHOD.md's facts, on open_clip's own modules."""

    def __init__(self, raw: dict, config: Path, weights: Path):
        section = {k: raw.get(k, raw.get(OLD_NAMES[k])) for k in OLD_NAMES}
        pl = section["prompt_learner"]
        self.normal, self.abnormal = pl["learnable_normal_tokens"], pl["learnable_abnormal_tokens"]
        self.layers = [pl[f"learnable_layer_tokens.{i}"] for i in range(len(pl)) if f"learnable_layer_tokens.{i}" in pl]
        self.visual_tokens = section["visual_prompt"]["learnable_visual_tokens"]
        la = section["linear_adapter"]
        self.adapters = [(la[f"fc.{k}.weight"], la[f"fc.{k}.bias"]) for k in range(len(TAPS))]
        self.clip = open_clip.create_model(config.stem, pretrained=str(weights)).eval()
        self.tokenizer = open_clip.get_tokenizer(config.stem)
        cfg = open_clip.get_model_preprocess_cfg(self.clip)
        self.mean, self.std = np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """RGB, bicubic to SIZE x SIZE, /255, the backbone's own mean/std; (3, S, S)."""
        arr = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float32) / 255
        return ((arr - self.mean) / self.std).transpose(2, 0, 1).copy()

    def encode_prompt(self, text: str, ctx: torch.Tensor) -> torch.Tensor:
        clip, d = self.clip, len(self.layers)
        blocks = clip.transformer.resblocks
        tokens = self.tokenizer([text])
        emb = clip.token_embedding(tokens)
        emb = torch.cat([emb[:, :1], ctx[None], emb[:, 1 + N_CTX:]], dim=1)
        x = emb + clip.positional_embedding
        if d:
            x = torch.cat([x[:, :1], self.layers[0][None], x[:, 1:]], dim=1)
        for i, block in enumerate(blocks):
            if 1 <= i <= d - 1:
                x = torch.cat([x[:, :1], ALPHA * x[:, 1:1 + SLOTS] + (1 - ALPHA) * self.layers[i][None],
                               x[:, 1 + SLOTS:]], dim=1)
            x = block(x, attn_mask=None)  # no causal mask
            if d < len(blocks) and i == d:
                x = torch.cat([x[:, :1], x[:, 1 + SLOTS:]], dim=1)
        x = clip.ln_final(x)
        return x[0, int(tokens[0].argmax())] @ clip.text_projection  # the template's end-of-text index

    def text_features(self, words: list[str]) -> torch.Tensor:
        ctx = " ".join(["X"] * N_CTX)

        def state(text: str, tokens: torch.Tensor) -> torch.Tensor:
            return F.normalize(torch.stack([self.encode_prompt(text, tokens[e]) for e in range(E)]).mean(0), dim=-1)

        return torch.stack([state(f"{ctx} flawless object", self.normal),
                            *(state(f"{ctx} {w} anomaly object", self.abnormal) for w in words)])

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        v = self.visual_tokens
        visual = self.clip.visual
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        x = torch.cat([x[:, :1], v[0].expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        patches = []
        for i, block in enumerate(visual.transformer.resblocks):
            if i >= 1:
                x = torch.cat([x[:, :1], ALPHA * x[:, 1:1 + SLOTS] + (1 - ALPHA) * v[i], x[:, 1 + SLOTS:]], dim=1)
            x = block(x)
            if i + 1 in TAPS:
                w, b = self.adapters[TAPS.index(i + 1)]
                patches.append(F.normalize(x[:, 1 + SLOTS:] @ w.T + b, dim=-1))
        return F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1), patches

    @torch.no_grad()
    def score(self, pixels: np.ndarray, words: list[str]) -> dict[str, np.ndarray]:
        text = self.text_features(words)
        t_abar = F.normalize(F.normalize(text[1:], dim=-1).mean(0), dim=-1)
        glob, patches = self.encode_image(torch.from_numpy(pixels))
        grid = int(round(patches[0].shape[1] ** 0.5))
        summed = 0
        for p in patches:
            probs = torch.softmax(p @ text.T / TAU, dim=-1).transpose(1, 2).reshape(len(p), -1, grid, grid)
            summed = summed + F.interpolate(probs, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
        return {
            "text": text.numpy(),
            "anomaly_score": torch.softmax(torch.stack([glob @ text[0], glob @ t_abar], -1) / TAU, -1)[:, 1].numpy(),
            "type_scores": torch.softmax(glob @ text.T / TAU, dim=-1).numpy(),
            "class_sum": summed.numpy(),
            "anomaly_sum": summed[:, 1:].sum(1).numpy(),
            "type_map": summed.argmax(1).numpy(),
        }


def sample_images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    ramp = np.zeros((SIZE, SIZE, 3), np.uint8)
    ramp[..., 0] = np.linspace(0, 255, SIZE, dtype=np.uint8)[None]
    ramp[..., 1] = np.linspace(255, 0, SIZE, dtype=np.uint8)[:, None]
    ramp[20:34, 10:30] = rng.integers(0, 256, (14, 20, 3))
    return [Image.fromarray(ramp), Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))]  # resized on the way


def import_and_bake(tmp_path: Path, pth: Path, backbone: tuple[Path, Path], capsys) -> tuple[Path, dict]:
    config, weights = backbone
    ck, art = tmp_path / "ck", tmp_path / "artifact"
    assert main(["import-authors", str(pth), "--backbone", str(config), "--pretrained", str(weights),
                 "--image-size", str(SIZE), "--vocab", "Scratch,hole,faulty_imprint", "--out", str(ck)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "ignored optimizer_state_dict" in captured.err and "meta_net.0.weight" in captured.err
    assert main(["bake", "--checkpoint", str(ck), "--out", str(art)]) == 0
    capsys.readouterr()
    return art, report


@pytest.mark.parametrize("depth,old_names", [(TEXT_DEPTH, False), (2, True)], ids=["D=depth", "D<depth-old-names"])
def test_imported_artifact_serves_as_the_authors_score(tmp_path, backbone, capsys, depth, old_names):
    pth = tmp_path / "epoch_4.pth"
    raw = authors_file(pth, depth, old_names)
    art, report = import_and_bake(tmp_path, pth, backbone, capsys)

    # the import reports what it read and skipped, and the checkpoint records where it came from
    section = OLD_NAMES["prompt_learner"] if old_names else "prompt_learner"
    assert report["sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest() and report["epoch"] == 4
    assert report["text_deep_layers"] == depth and report["visual_deep_layers"] == TINY["vision_cfg"]["layers"]
    assert set(report["ignored"]) == {"optimizer_state_dict", *(f"{section}.meta_net.{i}.{p}" for i in (0, 2)
                                                                 for p in ("weight", "bias"))}
    assert report["extra_entries"] == ["training_info"]
    m = load_manifest(art)
    assert m.text_mode == "reference" and m.class_names == ["normal", *WORDS] and m.tapped_layers == TAPS
    assert m.provenance["imported"]["sha256"] == report["sha256"] and m.provenance["imported"]["epoch"] == 4
    assert m.provenance["imported"]["file"] == str(pth.resolve())

    ref = AuthorsInference(raw, *backbone)
    # the served pixels are the reference's: same resize, the backbone's own mean/std
    images = sample_images()
    pixels = np.stack([preprocess(im.convert("RGB"), m.image_size, m.mean, m.std) for im in images])
    np.testing.assert_allclose(pixels, np.stack([ref.pixels(im) for im in images]), atol=1e-5)
    pixels = np.concatenate([pixels, np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE), np.float32)])

    want = ref.score(pixels, WORDS)
    np.testing.assert_allclose(load_file(str(art / "text_features.safetensors"))["text_features"], want["text"],
                               atol=ATOL)
    out = create_backend(art, m, "onnxruntime").run(pixels, np.ones((len(pixels), 1 + len(WORDS)), bool),
                                                    class_probs=True)
    layers = len(TAPS)
    np.testing.assert_allclose(out.anomaly_score, want["anomaly_score"], atol=ATOL)
    np.testing.assert_allclose(out.type_scores, want["type_scores"], atol=ATOL)
    np.testing.assert_allclose(out.anomaly_map, want["anomaly_sum"] / layers, atol=ATOL)
    np.testing.assert_allclose(out.class_probs, want["class_sum"] / layers, atol=ATOL)
    # type map: identical wherever the reference's best two classes are more than float noise apart
    top2 = np.sort(want["class_sum"], axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 1e-5
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(out.type_map[decided], want["type_map"][decided])
    # the scores are not saturated, so matching them means something
    assert 0.01 < want["anomaly_score"].min() and want["anomaly_score"].max() < 0.99
    assert len(np.unique(want["type_map"])) > 1

    # ... and the real app answers /detect with them
    with TestClient(create_app(Settings(artifact=art, max_queue_delay_ms=0), configure_logs=False)) as client:
        files = []
        for i, im in enumerate(images):
            buf = io.BytesIO()
            im.save(buf, "PNG")
            files.append(("image", (f"i{i}.png", buf.getvalue(), "image/png")))
        r = client.post("/detect?mask_format=none", files=files)
    assert r.status_code == 200, r.text
    for i, result in enumerate(r.json()["results"]):
        assert result["anomaly_score"] == pytest.approx(float(want["anomaly_score"][i]), abs=ATOL)
        given = want["type_scores"][i, 1:] / want["type_scores"][i, 1:].sum()  # P(type | defective)
        for entry in result["defect_types"]:
            assert entry["score"] == pytest.approx(float(given[WORDS.index(entry["name"])]), abs=ATOL)


def test_the_fixed_mode_differs_from_the_reference(tmp_path, backbone, capsys):
    """Control: the same tensors in `fixed` mode (causal mask, slots removed) do not match the
    authors' scores, so the comparison above can tell the modes apart."""
    from training.checkpoint import load_checkpoint

    pth = tmp_path / "epoch_4.pth"
    raw = authors_file(pth, TEXT_DEPTH)
    config, weights = backbone
    assert main(["import-authors", str(pth), "--backbone", str(config), "--pretrained", str(weights),
                 "--image-size", str(SIZE), "--vocab", ",".join(WORDS), "--out", str(tmp_path / "ck")]) == 0
    model, _ = load_checkpoint(tmp_path / "ck")
    want = AuthorsInference(raw, *backbone).text_features(WORDS)
    with torch.no_grad():
        np.testing.assert_allclose(model.text_features(WORDS), want, atol=ATOL)
        model.text_prompts.mode = "fixed"
        assert (model.text_features(WORDS) - want).abs().max() > 1e-2


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_import_refuses_what_does_not_fit(tmp_path, backbone, capsys):
    config, weights = backbone
    base = ["--backbone", str(config), "--pretrained", str(weights), "--image-size", str(SIZE), "--vocab", "hole"]
    pth = tmp_path / "a.pth"

    def variant(edit) -> list[str]:
        raw = authors_file(pth, 2)
        edit(raw)
        torch.save(raw, pth)
        return ["import-authors", str(pth), *base, "--out", str(tmp_path / "ck")]

    # a text width the backbone does not have: file, tensor and both shapes named
    code, err = _run(variant(lambda r: r["prompt_learner"].update(
        learnable_normal_tokens=torch.zeros(E, N_CTX, 64))), capsys)
    assert code == 2 and str(pth) in err and "prompt_learner.learnable_normal_tokens" in err
    assert "(3, 5, 64)" in err and "(3, 5, 32)" in err
    # a visual depth other than the vision tower's
    code, err = _run(variant(lambda r: r["visual_prompt"].update(
        learnable_visual_tokens=torch.zeros(5, SLOTS, 48))), capsys)
    assert code == 2 and "visual_prompt.learnable_visual_tokens" in err and "(5, 4, 48)" in err and "(3, 4, 48)" in err
    # more deep text layers than the text tower has
    code, err = _run(variant(lambda r: r["prompt_learner"].update(
        {f"learnable_layer_tokens.{i}": torch.zeros(SLOTS, 32) for i in range(TEXT_DEPTH + 1)})), capsys)
    assert code == 2 and "learnable_layer_tokens" in err and "(5, 4, 32)" in err and "(4, 4, 32)" in err
    # an adapter of the wrong width
    code, err = _run(variant(lambda r: r["linear_adapter"].update({"fc.1.weight": torch.zeros(24, 96)})), capsys)
    assert code == 2 and "linear_adapter.fc.1.weight" in err and "(24, 96)" in err and "(24, 48)" in err
    # an unknown entry, a missing state dict, both namings at once
    code, err = _run(variant(lambda r: r["linear_adapter"].update({"mystery.weight": torch.zeros(1)})), capsys)
    assert code == 2 and "unknown entry linear_adapter.mystery.weight" in err
    code, err = _run(variant(lambda r: r.pop("visual_prompt")), capsys)
    assert code == 2 and "'visual_prompt' or 'visual_prompt_state_dict'" in err
    code, err = _run(variant(lambda r: r.update(prompt_learner_state_dict=r["prompt_learner"])), capsys)
    assert code == 2 and "both" in err
    assert not (tmp_path / "ck").exists()  # nothing half-written


def test_import_refuses_pickled_objects(tmp_path, backbone, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    config, weights = backbone
    torch.save({"prompt_learner": Evil()}, tmp_path / "evil.pth")
    code, err = _run(["import-authors", str(tmp_path / "evil.pth"), "--backbone", str(config), "--pretrained",
                      str(weights), "--image-size", str(SIZE), "--vocab", "hole", "--out", str(tmp_path / "ck")],
                     capsys)
    assert code == 2 and "weights_only=True" in err and "pwned" not in capsys.readouterr().out
