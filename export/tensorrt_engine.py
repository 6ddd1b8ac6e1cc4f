"""ONNX → TensorRT (10+) FP16 engine, written into the engine cache with its sidecar.

The cache's keys and sidecars (runtime/backends/engine_cache.py) pin each engine to the GPU,
TensorRT and ONNX graph it was built for; the TensorRT backend checks them when it loads one.

Written against the TensorRT 10 Python API (``Builder``, ``OnnxParser.parse_from_file``,
``IBuilderConfig.builder_optimization_level``, ``create_timing_cache``/``set_timing_cache``,
``build_serialized_network``); tensorrt does not install on the development machine, so only the
key/sidecar logic (engine_cache.py) is exercised there.
"""
from __future__ import annotations

import logging
from pathlib import Path

from cytoedge.runtime.backends.engine_cache import (check_sidecar, current_platform, default_cache_dir, engine_key,
                                                    engine_paths, read_sidecar, write_sidecar)
from cytoedge.runtime.backends.engine_spec import NetworkSpec
from cytoedge.runtime.errors import BackendError

log = logging.getLogger(__name__)

DEFAULT_OPTIMISATION_LEVEL = 3  # TensorRT's default; 5 searches longest


def build_engine(onnx_path: Path, spec: NetworkSpec, cache_dir: Path | None = None,
                 optimisation_level: int = DEFAULT_OPTIMISATION_LEVEL, timing_cache: Path | None = None,
                 workspace_mib: int = 4096, strongly_typed: bool | None = None, force: bool = False) -> Path:
    """Build (or reuse from the cache) the FP16 engine of ``onnx_path``; returns the engine file.

    An ONNX graph already converted to FP16 (``export.fp16``) is built *strongly typed*: TensorRT keeps
    exactly its FP16/FP32 split. An FP32 graph is built with the FP16 flag, normalisation, softmax and
    reduction layers pinned to FP32.
    """
    import tensorrt as trt

    if not 0 <= optimisation_level <= 5:
        raise BackendError(f"builder optimisation level must be 0..5, got {optimisation_level}")
    onnx_path = Path(onnx_path)
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = engine_key(spec, onnx_path, "fp16", current_platform())
    engine_path, _ = engine_paths(cache_dir, key)
    if engine_path.is_file() and not force:
        check_sidecar(read_sidecar(engine_path), key, engine_path)
        log.info("reusing cached engine %s", engine_path)
        return engine_path
    if strongly_typed is None:
        strongly_typed = _has_fp16_tensors(onnx_path)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimisation_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _pin_fp32_layers(network, trt)
    cache_bytes = timing_cache.read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    for p in spec.profiles:
        profile = builder.create_optimization_profile()
        for t in spec.inputs:
            profile.set_shape(t.name, t.concrete(p.min), t.concrete(p.opt), t.concrete(p.max))
        config.add_optimization_profile(profile)
    log.info("building %s engine from %s (level %d, %d profiles, strongly typed: %s)", spec.name, onnx_path.name,
             optimisation_level, len(spec.profiles), strongly_typed)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    write_sidecar(engine_path, key, {"builder_optimization_level": optimisation_level,
                                     "strongly_typed": strongly_typed, "onnx_file": onnx_path.name,
                                     "spec": spec.to_dict()})
    log.info("wrote %s", engine_path)
    return engine_path


def _pin_fp32_layers(network, trt) -> None:
    """Keep normalisation, softmax and reductions in FP32 inside an otherwise FP16 engine."""
    fp32_types = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in fp32_types:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def _has_fp16_tensors(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
