"""Bake: export parity (training model vs ONNX Runtime vs service torch), filters, re-bake."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from service.runtime.artifact import load_manifest
from service.runtime.backends import create_backend
from training.bake import DEMO_VOCAB, BakeOptions, bake, demo_model
from training.checkpoint import save_checkpoint


def _inputs(manifest, batch, seed=0):
    rng = np.random.default_rng(seed)
    s = manifest.image_size
    return rng.standard_normal((batch, 3, s, s), dtype=np.float32), np.ones((batch, len(manifest.vocabulary)), bool)


def test_demo_artifact_is_complete_and_verified(demo_artifact):
    m = load_manifest(demo_artifact)
    assert set(m.files) == {"encoder.onnx", "encoder.safetensors", "text_features.safetensors"}
    assert m.class_names == ["normal", *DEMO_VOCAB]
    assert m.verification.passed and m.verification.tolerance == 1e-4
    assert max(m.verification.max_abs_diff.values()) < 1e-5
    assert {f"{b}.{o}" for b in ("onnxruntime", "torch") for o in ("anomaly_score", "anomaly_map", "class_probs")} \
        <= set(m.verification.max_abs_diff)
    assert m.verification.type_map_mismatch_fraction == 0.0
    assert m.tapped_layers == [1, 2, 3, 4] and m.image_size == 112 and m.temperature == 0.07
    assert "DEMO" in m.description and m.provenance["weights"] == "random"
    feats = load_file(str(demo_artifact / "text_features.safetensors"))
    assert feats["text_features"].shape == (len(DEMO_VOCAB) + 1, m.backbone.embed_dim)


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_and_torch_backends_agree_at_any_batch(demo_artifact, batch):
    m = load_manifest(demo_artifact)
    pixels, allowed = _inputs(m, batch, seed=batch)
    a = create_backend(demo_artifact, m, "onnxruntime").run(pixels, allowed)
    b = create_backend(demo_artifact, m, "torch", device="cpu").run(pixels, allowed)
    assert a.anomaly_map.shape == (batch, m.image_size, m.image_size) and a.type_map.dtype == np.uint8
    assert a.type_scores.shape == a.class_max.shape == (batch, len(m.vocabulary))
    for name in ("anomaly_score", "type_scores", "anomaly_map", "class_max"):  # measured: 3e-7
        assert np.abs(getattr(a, name) - getattr(b, name)).max() < 1e-5, name
    np.testing.assert_array_equal(a.type_map, b.type_map)
    assert ((a.anomaly_map >= 0) & (a.anomaly_map <= 1 + 1e-6)).all()
    np.testing.assert_allclose(a.type_scores.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_batch_size_changes_no_output(demo_artifact, backend):
    """Five images in one batch give what each gives alone (measured: 6e-8, type maps equal)."""
    m = load_manifest(demo_artifact)
    pixels, allowed = _inputs(m, 5, seed=21)
    allowed[1, 2:] = False  # rows differ in what may compete too
    engine = create_backend(demo_artifact, m, backend, device="cpu")
    batched = engine.run(pixels, allowed)
    for i in range(5):
        alone = engine.run(pixels[i:i + 1], allowed[i:i + 1])
        for name in ("anomaly_score", "type_scores", "anomaly_map", "class_max"):
            assert np.abs(getattr(batched, name)[i] - getattr(alone, name)[0]).max() < 1e-5, (i, name)
        np.testing.assert_array_equal(batched.type_map[i], alone.type_map[0])


def test_outputs_match_the_training_model(demo_artifact, tiny_model):
    """The artifact computes METHOD.md's scoring from the training model's own features."""
    m = load_manifest(demo_artifact)
    pixels, allowed = _inputs(m, 2, seed=7)
    out = create_backend(demo_artifact, m, "onnxruntime").run(pixels, allowed)
    with torch.no_grad():
        text = tiny_model.text_features(DEMO_VOCAB)
        res = tiny_model(torch.from_numpy(pixels), text)
        img = torch.softmax(res["image_logits"], -1)[:, 1].numpy()
        up = torch.nn.functional.interpolate(res["patch_probs"].mean(0), size=(112, 112), mode="bilinear",
                                             align_corners=True)
    np.testing.assert_allclose(out.anomaly_score, img, atol=1e-5)
    np.testing.assert_allclose(out.anomaly_map, up[:, 1:].sum(1).numpy(), atol=1e-5)
    np.testing.assert_array_equal(out.type_map, up.argmax(1).numpy())


def test_product_filter_restricts_the_type_map(demo_artifact):
    m = load_manifest(demo_artifact)
    pixels, allowed = _inputs(m, 2)
    hole = m.class_names.index("hole")
    allowed[:] = False
    allowed[:, [0, hole]] = True
    out = create_backend(demo_artifact, m, "onnxruntime").run(pixels, allowed)
    assert set(np.unique(out.type_map)) == {0, hole}  # both compete, and both win somewhere


def test_bake_fails_above_tolerance_and_leaves_nothing(tmp_path, tiny_model):
    out = tmp_path / "strict"
    with pytest.raises(RuntimeError, match="verification failed"):
        bake(tiny_model, ["scratch"], out, BakeOptions(name="strict", tolerance=0.0))
    assert not out.exists() and not list(tmp_path.glob(".bake-*"))


def test_bake_refuses_bad_vocabularies_and_existing_folders(tmp_path, tiny_model, demo_artifact):
    # (repeats are no longer refused: the one vocabulary rule merges them, see test below)
    for words, msg in ((["Normal"], "class 0"), ([" "], "empty"), ([], "empty")):
        with pytest.raises(ValueError, match=msg):
            bake(tiny_model, words, tmp_path / "x", BakeOptions(name="x"))
    with pytest.raises(FileExistsError):
        bake(tiny_model, ["scratch"], demo_artifact, BakeOptions(name="x"))


def test_handcrafted_baseline_artifact(tmp_path, tiny_model):
    report = bake(tiny_model, ["scratch", "hole"], tmp_path / "hc", BakeOptions(name="hc", prompts="handcrafted"))
    m = report.manifest
    assert m.prompts == "handcrafted" and m.verification.passed
    learned = tiny_model.text_features(["scratch", "hole"]).detach().numpy()
    hand = load_file(str(report.folder / "text_features.safetensors"))["text_features"]
    assert hand.shape == learned.shape and np.abs(hand - learned).max() > 1e-2


def test_rebake_with_a_new_defect_word_needs_no_training(tmp_path):
    """Zero-shot: a word absent from training gets its own class id, features and masks."""
    from service.cli import main

    model = demo_model()
    ckpt = save_checkpoint(model, tmp_path / "ckpt", vocabulary=["scratch", "hole"])
    assert main(["bake", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a1")]) == 0
    # --add-defect goes through the vocabulary rule `dapo train` applies: 'Scratch' is 'scratch'
    assert main(["bake", "--checkpoint", str(ckpt), "--add-defect", "Burr,Scratch", "--out", str(tmp_path / "a2")]) == 0
    m1, m2 = load_manifest(tmp_path / "a1"), load_manifest(tmp_path / "a2")
    assert m1.class_names == ["normal", "scratch", "hole"]
    assert m2.class_names == ["normal", "scratch", "hole", "burr"]
    f1 = load_file(str(tmp_path / "a1" / "text_features.safetensors"))["text_features"]
    f2 = load_file(str(tmp_path / "a2" / "text_features.safetensors"))["text_features"]
    np.testing.assert_allclose(f2[:3], f1, atol=1e-6)  # the known classes are untouched
    assert (f2[3] @ f2[:3].T).max() < 0.999  # the new word is a feature of its own
    pixels, allowed = _inputs(m2, 4, seed=3)
    allowed[:, 1:3] = False  # a product that only knows 'burr'
    out = create_backend(tmp_path / "a2", m2, "onnxruntime").run(pixels, allowed)
    assert (out.type_map == 3).any() and set(np.unique(out.type_map)) <= {0, 3}
    assert out.class_max.shape == (4, 4)


def test_cli_demo_bake_prints_figures(tmp_path, capsys):
    from service.cli import main

    assert main(["bake", "--demo", "--out", str(tmp_path / "demo")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parity_max_abs_diff"] < 1e-4 and report["bytes"]["encoder.onnx"] > 0


def test_pixel_statistics_come_from_the_backbone(tmp_path):
    """bake writes the backbone's own mean/std (OpenCLIP's preprocess config), not OpenAI's,
    and training's data pipeline reads the same (`DapoModel.normalisation`)."""
    import open_clip

    model = demo_model()
    siglip = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")  # (0.5, 0.5, 0.5) statistics
    cfg = {**open_clip.get_model_preprocess_cfg(model.clip), "mean": siglip["mean"], "std": siglip["std"]}
    open_clip.set_model_preprocess_cfg(model.clip, cfg)
    assert model.normalisation == (tuple(siglip["mean"]), tuple(siglip["std"]))
    bake(model, ["scratch"], tmp_path / "a", BakeOptions(name="a"))
    m = load_manifest(tmp_path / "a")
    assert tuple(m.mean) == tuple(m.std) == (0.5, 0.5, 0.5)


def test_io_binding_path_gives_the_same_outputs(demo_artifact):
    """The I/O-binding path (default on CUDA/TensorRT) run here on the CPU EP: same numbers."""
    m = load_manifest(demo_artifact)
    pixels, allowed = _inputs(m, 3, seed=11)
    plain = create_backend(demo_artifact, m, "onnxruntime", io_binding=False)
    bound = create_backend(demo_artifact, m, "onnxruntime", io_binding=True)
    assert not plain.io_binding and bound.io_binding
    for probs in (False, True):
        a, b = plain.run(pixels, allowed, class_probs=probs), bound.run(pixels, allowed, class_probs=probs)
        assert (b.class_probs is None) is (not probs)
        for name in ("anomaly_score", "type_scores", "anomaly_map", "type_map", "class_max"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
