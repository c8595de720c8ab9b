"""The DINOv2 -> OpenCLIP converter (training/convert_dinov2.py).

CI cannot download the 97 MB graph, so the converter's logic is checked on a tiny graph with
the same layout: a Hugging Face-named DINOv2 (LayerScale, patch bias, CLS, position table
interpolated inside the graph, decomposed LayerNorm with eps 1e-6, erf GELU) exported by
torch at opset 14 like vit_s_focus.onnx, which leaves the q/k/v/out/fc1/fc2 weights as unnamed
MatMul initializers. The real file is checked when it is present ($DAPO_DINOV2_ONNX or the
cache path `dapo convert-dinov2 --fetch` writes to).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from service.runtime.artifact import sha256_file
from training.convert_dinov2 import (MODEL_NAME, ONNX_ENV, ONNX_SHA256, VERIFY_TOLERANCE, TextTowerSpec, convert,
                                     default_onnx_path, read_onnx, verify)

W, HEADS, LAYERS, PATCH, TABLE, SIZE = 32, 2, 2, 4, 6, 16  # 6x6 table, 16 px input: 4x4 grid
TEXT = TextTowerSpec(heads=2, layers=1, context_length=16)


class _LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.rand(W) + 0.5)

    def forward(self, x):
        return x * self.lambda1


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(W, W), nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        k = self.key(x).view(b, n, HEADS, W // HEADS).transpose(1, 2)
        v = self.value(x).view(b, n, HEADS, W // HEADS).transpose(1, 2)
        q = self.query(x).view(b, n, HEADS, W // HEADS).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-1, -2) * (W // HEADS) ** -0.5, dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, n, W)


class _Output(nn.Module):  # modules are called, not just containers, so that nodes get HF's scope names
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(W, W)

    def forward(self, x):
        return self.dense(x)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.output = _SelfAttention(), _Output()

    def forward(self, x):
        return self.output(self.attention(x))


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.activation, self.fc2 = nn.Linear(W, 4 * W), nn.GELU(), nn.Linear(4 * W, W)

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(W, eps=1e-6), nn.LayerNorm(W, eps=1e-6)
        self.attention, self.mlp = _Attention(), _Mlp()
        self.layer_scale1, self.layer_scale2 = _LayerScale(), _LayerScale()

    def forward(self, x):
        x = self.layer_scale1(self.attention(self.norm1(x))) + x
        return self.layer_scale2(self.mlp(self.norm2(x))) + x


class _PatchEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.projection = nn.Conv2d(3, W, PATCH, PATCH)  # with a bias, as DINOv2's

    def forward(self, pixels):
        return self.projection(pixels).flatten(2).transpose(1, 2)


class _Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, W))
        self.position_embeddings = nn.Parameter(torch.randn(1, 1 + TABLE * TABLE, W))
        self.patch_embeddings = _PatchEmbeddings()

    def forward(self, pixels):
        x = self.patch_embeddings(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        dim = x.shape[-1]  # traced from the input, so the table's reshape stays in the graph (as in HF)
        table = self.position_embeddings[:, 1:].reshape(1, TABLE, TABLE, dim).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(SIZE // PATCH, SIZE // PATCH), mode="bicubic", align_corners=False)
        table = torch.cat([self.position_embeddings[:, :1], table.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
        return x + table


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList(_Layer() for _ in range(LAYERS))

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings, self.encoder, self.layernorm = _Embeddings(), _Encoder(), nn.LayerNorm(W, eps=1e-6)

    def forward(self, pixels):
        return self.layernorm(self.encoder(self.embeddings(pixels)))


class TinyDino(nn.Module):
    """The HF module tree of vit_s_focus.onnx's backbone, tiny; the decoder is left out."""

    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()

    def forward(self, input_image):
        return self.backbone(input_image)[:, 0]


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyDino().eval()
    with torch.no_grad():  # norms and biases away from their constant init
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("dino") / "tiny_dino.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(1, 3, SIZE, SIZE), str(path), input_names=["input_image"],
                          output_names=["cls"], dynamic_axes={"input_image": {0: "batch_size"}}, opset_version=14,
                          dynamo=False)
    return path, model


def test_tiny_graph_has_the_layout_of_the_real_one(tiny_graph):
    import onnx

    graph = onnx.load(str(tiny_graph[0])).graph
    unnamed = [t.name for t in graph.initializer if not t.name.startswith("backbone.")]
    assert sum(n.startswith("onnx::MatMul") for n in unnamed) == 6 * LAYERS  # q/k/v/out/fc1/fc2, unnamed
    assert {n.op_type for n in graph.node} >= {"Erf", "Resize", "ReduceMean"}  # erf GELU, decomposed LayerNorm


def test_converter_reads_the_graph_and_matches_it_block_by_block(tiny_graph, tmp_path):
    path, _ = tiny_graph
    g = read_onnx(path)
    assert (g.width, g.heads, g.layers, g.patch_size, g.mlp_width, g.grid, g.eps, g.act) == \
        (W, HEADS, LAYERS, PATCH, 4 * W, TABLE, 1e-6, "gelu")
    res = convert(path, tmp_path, text=TEXT, check_sha=False)
    cfg = json.loads(res.config.read_text())
    v = cfg["vision_cfg"]
    assert (v["no_ln_pre"], v["norm_kwargs"], v["image_size"], cfg["embed_dim"], cfg["quick_gelu"]) == \
        (True, {"eps": 1e-6}, TABLE * PATCH, W, False)
    assert "ls_init_value" in v and cfg["text_cfg"]["width"] == W  # full-rank text projection
    sd = load_file(str(res.weights))
    assert torch.equal(sd["visual.proj"], torch.eye(W))
    report = verify(path, res.config, res.weights)
    assert report["image_size"] == SIZE
    assert report["worst_rel_graph_table"] < VERIFY_TOLERANCE, report["graph_table"]


def test_verification_catches_a_wrong_mapping(tiny_graph, tmp_path):
    """Swap q and k in block 0: the check must fail loudly, not pass by construction."""
    path, _ = tiny_graph
    res = convert(path, tmp_path, text=TEXT, check_sha=False)
    sd = load_file(str(res.weights))
    w = sd["visual.transformer.resblocks.0.attn.in_proj_weight"]
    sd["visual.transformer.resblocks.0.attn.in_proj_weight"] = torch.cat([w[W:2 * W], w[:W], w[2 * W:]])
    save_file(sd, str(res.weights))
    assert verify(path, res.config, res.weights)["worst_rel_graph_table"] > 1e-3


def test_a_graph_that_is_not_dinov2_is_refused(tmp_path):
    path = tmp_path / "other.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Linear(4, 4), torch.randn(1, 4), str(path), opset_version=14, dynamo=False)
    with pytest.raises(ValueError, match="sha256"):
        convert(path, tmp_path / "out")
    with pytest.raises(ValueError):
        read_onnx(path)


def test_converter_reports_a_missing_file_with_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="--fetch"):
        convert(tmp_path / "absent.onnx", tmp_path / "out")


REAL = default_onnx_path()


@pytest.mark.skipif(not REAL.is_file(), reason=f"DINOv2 graph absent: set {ONNX_ENV} or run "
                                               f"`dapo convert-dinov2 --fetch` (downloads 90 MB; CI does not)")
def test_real_dinov2_conversion_matches_the_graph(tmp_path):
    assert sha256_file(REAL) == ONNX_SHA256
    res = convert(REAL, tmp_path)
    assert res.config.name == f"{MODEL_NAME}.json"
    report = verify(REAL, res.config, res.weights)
    # float32 rounding through 12 blocks; the graph's activations reach ~18
    assert report["worst_rel_graph_table"] < VERIFY_TOLERANCE, report["graph_table"]
    # the product resizes the 37x37 table with OpenCLIP's antialiased bicubic, the graph without
    assert report["product_table"]["class_token_cosine_min"] > 0.999
