"""FP32 ONNX → FP16 ONNX, keeping FP32 where half precision is known to break.

Kept in FP32 (inputs and outputs stay FP32 too, so backends feed the same arrays):
- normalisation layers (GroupNorm exports as InstanceNormalization; Layer/GroupNormalization):
  their variance of large activations overflows or loses all precision in FP16;
- the attention softmax and every reduction (ReduceMean/ReduceSum/…): sums of many terms;
- exponentials, powers and square roots;
- the conditioning path (timestep and class embeddings): ``t · freq`` reaches ~1000 rad, where FP16's
  spacing (0.5) would scramble the sinusoidal embedding;
- in the fused error graph, everything outside the denoiser (the noising and the error reduction).

Uses ``onnxruntime.transformers.float16.convert_float_to_float16`` (onnxconverter_common's converter
produced a graph ONNX Runtime refused here).
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

FP32_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization",
            "Softmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Exp", "Pow", "Sqrt",
            "Sin", "Cos", "Range", "Resize")
# Per-sample conditioning inputs: nodes that depend on nothing else belong to the embedding path.
CONDITIONING_INPUTS = ("timestep", "class_id", "weight")
# Inside the fused graph, the exported denoiser's nodes carry this scope prefix.
DENOISER_SCOPE = "/denoiser/"


def conditioning_nodes(graph, conditioning_inputs: tuple[str, ...] = CONDITIONING_INPUTS) -> list[str]:
    """Names of nodes whose every graph-input ancestor is a conditioning input (not an image)."""
    image_inputs = {i.name for i in graph.input} - set(conditioning_inputs)
    initialisers = {i.name for i in graph.initializer}
    depends_on_image: dict[str, bool] = {name: True for name in image_inputs}
    out = []
    for node in graph.node:  # ONNX graphs are stored in topological order
        on_image = any(depends_on_image.get(t, False) for t in node.input if t and t not in initialisers)
        for t in node.output:
            depends_on_image[t] = on_image
        if not on_image and node.op_type != "Constant":
            out.append(node.name)
    return out


def fused_error_nodes(graph) -> list[str]:
    """Nodes of a fused error graph outside the denoiser: noising and the error reduction."""
    if not any(n.name.startswith(DENOISER_SCOPE) for n in graph.node):
        return []
    return [n.name for n in graph.node if n.name and not n.name.startswith(DENOISER_SCOPE)
            and n.op_type != "Constant"]


def sort_topologically(graph) -> None:
    """Reorder ``graph.node`` in place so every node follows its producers.

    The converter appends its Cast nodes at the end; ONNX (and TensorRT's parser) require topological order.
    """
    import onnx

    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = []
    for n in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        pending.append(copy)
    ordered = []
    while pending:
        ready = [all(t in available for t in n.input) for n in pending]
        if not any(ready):
            raise ValueError(f"graph has a cycle or a dangling input near node {pending[0].name!r}")
        for n, ok in zip(pending, ready):
            if ok:
                available.update(n.output)
                ordered.append(n)
        pending = [n for n, ok in zip(pending, ready) if not ok]
    del graph.node[:]
    graph.node.extend(ordered)


def convert_to_fp16(src: Path, dst: Path, extra_fp32_ops: tuple[str, ...] = ()) -> dict:
    """Write an FP16 copy of ``src`` to ``dst``; returns what was kept in FP32 (for the export report)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    ops = sorted(set(FP32_OPS) | set(extra_fp32_ops))
    nodes = sorted(set(conditioning_nodes(model.graph)) | set(fused_error_nodes(model.graph)))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=ops, node_block_list=nodes)
    sort_topologically(half.graph)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(half, str(dst))
    onnx.checker.check_model(str(dst))
    log.info("FP16 graph %s: %d ops types and %d nodes kept in FP32", dst, len(ops), len(nodes))
    return {"fp32_op_types": ops, "fp32_nodes": len(nodes)}
