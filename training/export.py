"""Export the image side of a DapoModel (+ baked text features + scoring head).

Two forms of one computation, both honouring `service.runtime.backends.base`'s contract:
- `encoder.onnx` for ONNX Runtime (dynamic batch), traced from the training model itself;
- `encoder.safetensors` for the service's plain-PyTorch encoder (no pickle, no OpenCLIP).
Bake then runs all three (training model, ORT, service torch) on the same inputs.

Optionally (`dapo bake --fp16`) a third: `encoder_fp16.onnx`, the ONNX graph converted to fp16
compute for ONNX Runtime on a GPU, with the same inputs and outputs (names and dtypes) as the
fp32 graph. Bake checks it against the fp32 model too, with a tolerance suited to fp16.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from safetensors.torch import save_file
from torch import nn

from service.runtime.artifact import EncoderGeometry
from service.runtime.backends.base import FEATURE_OUTPUTS, GRAPH_OUTPUTS, INPUT_NAMES, reference_taps
from service.runtime.backends.torch_model import ScoringHead, reference_features, state_dict_for_export
from training.model import DapoModel

OPSET = 18

# fp16 export: op types kept in fp32 (statistics, exponentials and norms lose range or precision
# in half: LayerNorm's variance, Softmax, the L2 normalisations of the tapped features, ...)
FP16_KEEP_FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceL2", "ReduceSum", "ReduceMax",
                      "Resize")
# the scoring head stays fp32 as a whole: it works on small tensors (features x C text features)
# and ends in probabilities, an argmax and thresholds, where half precision buys nothing
FP16_KEEP_FP32_PREFIX = "/head/"


class ExportModule(nn.Module):
    """pixel_values, allowed -> the contract outputs, via the training model's own forward."""

    def __init__(self, model: DapoModel, text_features: torch.Tensor, abnormal: torch.Tensor):
        super().__init__()
        self.model = model
        geo = encoder_geometry(model)
        self.head = ScoringHead(text_features, abnormal, geo.grid, geo.image_size, geo.temperature)

    def forward(self, pixel_values: torch.Tensor, allowed: torch.Tensor):
        """The contract outputs, then FEATURE_OUTPUTS (the reference search's inputs)."""
        raw: list[torch.Tensor] = []
        global_feat, patches = self.model.visual_prompts(self.model.clip.visual, pixel_values, raw=raw)
        taps = self.model.visual_prompts.taps
        keep = [raw[taps.index(t)] for t in reference_taps(taps)]
        return (*self.head(global_feat, patches, allowed), reference_features(keep), global_feat.float())


def export_onnx(module: ExportModule, path: Path, image_size: int, n_classes: int) -> Path:
    """Trace to ONNX with a dynamic batch axis on every input and output."""
    module.eval()
    example = (torch.randn(2, 3, image_size, image_size), torch.ones(2, n_classes, dtype=torch.bool))
    dynamic = {name: {0: "batch"} for name in (*INPUT_NAMES, *GRAPH_OUTPUTS, *FEATURE_OUTPUTS)}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX symbolic
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(path), input_names=list(INPUT_NAMES),
                              output_names=[*GRAPH_OUTPUTS, *FEATURE_OUTPUTS], dynamic_axes=dynamic, opset_version=OPSET,
                              dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def fp16_blocked_nodes(graph) -> list[str]:
    """Nodes `export_onnx_fp16` keeps in fp32 by name, beyond the op types FP16_KEEP_FP32_OPS:
    the scoring head (every node under FP16_KEEP_FP32_PREFIX)."""
    head = [n.name for n in graph.node if n.name.startswith(FP16_KEEP_FP32_PREFIX)]
    if not head:
        raise RuntimeError(f"no scoring-head nodes ({FP16_KEEP_FP32_PREFIX}*) in the exported graph")
    return head


def separate_transposes_from_matmuls(graph) -> int:
    """Put an identity Reshape between each Transpose and a MatMul that reads it; returns how many.

    Works around a crash in ONNX Runtime (found with 1.32.0): its MatmulTransposeFusion rewrites
    Transpose -> Cast -> MatMul by swapping Cast and Transpose (ReorderCastAndTranspose) and leaves
    the graph inconsistent; the CPU provider's NchwcTransformer then segfaults at session creation
    (ORT_ENABLE_ALL, the service's level). Disabling either transformer avoids it. In an fp16 graph
    the chain forms on the CPU provider by itself: it has no fp16 MatMul kernel, so it inserts a
    Cast to fp32 in front of each MatMul, here right after the attention's input Transpose (perm
    (1, 0, 2)). Keeping that Transpose in fp32 instead would write the same chain (Transpose ->
    Cast to fp16 -> MatMul) into the graph for the CUDA provider, which has fp16 MatMul. With a
    Reshape in between the chain never forms on any provider: the Transpose and the MatMul stay
    fp16, unfused, and the Reshape (same shape) copies nothing.
    """
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes, count = [], 0
    for node in graph.node:
        nodes.append(node)
        matmuls = [c for c in consumers.get(node.output[0], []) if c.op_type == "MatMul"] \
            if node.op_type == "Transpose" else []
        if not matmuls:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if perm is None:  # rank unknown here; torch always writes perm (bake's check would catch it)
            continue
        shape = onnx.helper.make_tensor(f"{node.name}_same_shape", onnx.TensorProto.INT64, [len(perm)],
                                        [0] * len(perm))  # 0 = keep that dimension
        graph.initializer.append(shape)
        out = f"{node.output[0]}_for_matmul"
        nodes.append(onnx.helper.make_node("Reshape", [node.output[0], shape.name], [out],
                                           name=f"{node.name}_for_matmul"))
        for mm in matmuls:
            mm.input[:] = [out if x == node.output[0] else x for x in mm.input]
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def export_onnx_fp16(fp32_path: Path, path: Path) -> Path:
    """`encoder_fp16.onnx` from the exported fp32 graph: fp16 weights and compute, fp32 where
    FP16_KEEP_FP32_OPS / `fp16_blocked_nodes` say, inputs and outputs exactly as in fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(fp32_path))
    io_types = _io_types(model)
    separate_transposes_from_matmuls(model.graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True,
                                        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32_OPS],
                                        node_block_list=fp16_blocked_nodes(model.graph))
    # the converter appends its Cast nodes at the end: ORT copes, the ONNX checker does not
    OnnxModel.graph_topological_sort(half.graph, is_deterministic=True)
    if _io_types(half) != io_types:
        raise RuntimeError(f"fp16 conversion changed the graph's inputs/outputs: {_io_types(half)} != {io_types}")
    onnx.checker.check_model(half)
    onnx.save(half, str(path))
    return path


def _io_types(model) -> dict[str, int]:
    g = model.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output)}


def export_safetensors(model: DapoModel, text_features: torch.Tensor, abnormal: torch.Tensor, path: Path) -> Path:
    """Weights for `service.runtime.backends.torch_model.DapoImageEncoder`, names already mapped."""
    sd = state_dict_for_export(model.clip.visual, model.visual_prompts.tokens, model.visual_prompts.adapters)
    sd["head.text"] = text_features.detach().float().contiguous()
    sd["head.abnormal"] = abnormal.detach().float().contiguous()
    save_file(sd, str(path), metadata={"format": "dapo-encoder", "version": "1"})
    return path


def encoder_geometry(model: DapoModel) -> EncoderGeometry:
    """The geometry the service needs to rebuild the encoder; bake writes it into the manifest."""
    g = model.geometry
    return EncoderGeometry(width=g["width"], layers=g["layers"], heads=g["heads"], patch_size=g["patch_size"],
                           image_size=g["image_size"], embed_dim=g["embed_dim"], taps=list(model.config.taps),
                           prompt_tokens=model.config.visual_deep_tokens, alpha=model.config.alpha, act=g["act"],
                           layer_scale=g["layer_scale"], ln_pre=g["ln_pre"], norm_eps=g["norm_eps"],
                           mlp_width=g["mlp_width"],
                           temperature=model.config.temperature)


def _norm_problem(name: str, norm: nn.Module, eps: float) -> str | None:
    if type(norm).__name__ not in ("LayerNorm", "LayerNormFp32") or not isinstance(norm, nn.LayerNorm):
        return f"{name} is {type(norm).__name__}, not a LayerNorm"
    if not norm.elementwise_affine or norm.bias is None:
        return f"{name} is a LayerNorm without weight and bias"
    if norm.eps != eps:
        return f"{name} has LayerNorm eps {norm.eps}, the tower's other norms {eps} (one eps per tower)"
    return None


def _block_problem(i: int, block: nn.Module, layer_scale: bool, eps: float) -> str | None:
    if type(block).__name__ != "ResidualAttentionBlock":
        return f"block type {type(block).__name__} (custom attention) is not in the torch encoder"
    if hasattr(block, "ln_1_kv") or not isinstance(block.attn, nn.MultiheadAttention) or not block.attn.batch_first \
            or block.attn.in_proj_bias is None or block.attn.bias_k is not None:
        return f"block {i}: attention other than batch-first self-attention with biases"
    act = block.mlp.gelu
    if type(act).__name__ != "QuickGELU" and not (type(act) is nn.GELU and act.approximate == "none"):
        return f"block {i}: activation {act!r} (the torch encoder has exact GELU and QuickGELU)"
    for side in ("ls_1", "ls_2"):
        ls = getattr(block, side)
        if isinstance(ls, nn.Identity) == layer_scale or (layer_scale and type(ls).__name__ != "LayerScale"):
            return f"block {i}: {side} is {type(ls).__name__}, the other blocks' LayerScale is {layer_scale}"
    for name in ("ln_1", "ln_2"):
        if problem := _norm_problem(f"block {i} {name}", getattr(block, name), eps):
            return problem
    return None


def torch_export_supported(model: DapoModel) -> str | None:
    """Why the service's plain-PyTorch encoder cannot reproduce this tower, or None if it can.

    The encoder reproduces plain CLIP plus `EncoderOptions` (LayerScale, no ln_pre, one
    LayerNorm eps, any MLP width, exact GELU or QuickGELU); every other OpenCLIP ViT option is
    named here, and bake then writes no `encoder.safetensors` (ONNX Runtime serves the
    artifact; the torch backend refuses it) instead of serving a different computation."""
    visual = model.clip.visual
    g = model.geometry
    if visual.pool_type != "tok" or visual.final_ln_after_pool:
        return f"pool type {visual.pool_type!r} (final_ln_after_pool={visual.final_ln_after_pool}) is not in the torch encoder"
    if visual.proj is None or visual.conv1.bias is not None:
        return "a tower without projection or with a patch-embedding bias is not in the torch encoder"
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        return f"non-square image {visual.image_size} / patch {visual.patch_size} is not in the torch encoder"
    if g["ln_pre"] and (problem := _norm_problem("ln_pre", visual.ln_pre, g["norm_eps"])):
        return problem
    if problem := _norm_problem("ln_post", visual.ln_post, g["norm_eps"]):
        return problem
    for i, block in enumerate(visual.transformer.resblocks):
        if problem := _block_problem(i, block, g["layer_scale"], g["norm_eps"]):
            return problem
    return None
