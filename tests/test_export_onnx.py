"""Re-export of the bundled denoiser: ONNX vs PyTorch, the fused error graph, FP16 with FP32 islands,
and decision agreement between backends (estimator as a parameter)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from cytoedge.export.export_bundle import export_bundle  # noqa: E402
from cytoedge.export.fp16 import conditioning_nodes  # noqa: E402
from cytoedge.export.validate import (decision_agreement, max_abs_error,  # noqa: E402
                                      reference_classifier)
from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from cytoedge.runtime.bundle import ModelBundle  # noqa: E402
from cytoedge.runtime.commands.bench import random_cells  # noqa: E402
from cytoedge.runtime.errors import BundleError  # noqa: E402
from cytoedge.kernels import masked_weighted_error  # noqa: E402


@pytest.fixture(scope="module")
def exported(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    report = export_bundle(bundle.path, out, batches=(1, 8), overwrite=True)
    return ModelBundle.load(out), report


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_matches_pytorch_and_has_dynamic_batch(exported):
    new, report = exported
    assert report["denoiser_max_abs_error_vs_torch"] < 1e-4
    model = onnx.load(str(new.denoiser_path))
    assert model.opset_import[0].version >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    rng = np.random.default_rng(3)
    for b in (1, 5):  # 5 is not a profile batch: the graph itself is dynamic
        eps = _session(new.denoiser_path).run(None, {"x_t": rng.standard_normal((b, 3, new.input_size, new.input_size))
                                                     .astype(np.float32), "timestep": np.arange(b) * 100,
                                                     "class_id": np.arange(b) % 8})[0]
        assert eps.shape == (b, 3, new.input_size, new.input_size)


def test_fused_graph_returns_the_masked_weighted_error_of_the_host_path(exported):
    new, report = exported
    rng = np.random.default_rng(4)
    b, s = 6, new.input_size
    x0 = rng.uniform(-1, 1, (b, 3, s, s)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([1, 50, 200, 500, 800, 999])
    c = np.array([0, 1, 2, 5, 6, 7])
    w = np.array([1, 2, 0.5, 1, 3, 1], np.float32)
    got = _session(new.network_path("denoiser_error")).run(
        None, {"x0": x0, "noise": noise, "timestep": t, "class_id": c, "weight": w})[0]
    eps = _session(new.denoiser_path).run(None, {"x_t": new.schedule.add_noise(x0, noise, t).astype(np.float32),
                                                 "timestep": t, "class_id": c})[0]
    want = masked_weighted_error(eps, noise, new.loss_mask()[None, None], w)
    assert got.shape == (b,)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_fp16_graph_is_half_precision_but_keeps_normalisation_in_fp32(exported):
    new, report = exported
    model = onnx.load(str(new.network_path("denoiser_fp16")))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(inits[w] == onnx.TensorProto.FLOAT16 for w in conv_weights)
    norm_params = [t for n in model.graph.node if n.op_type == "InstanceNormalization" for t in n.input[1:]]
    assert norm_params and all(inits.get(p, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for p in norm_params)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    assert 0 < report["denoiser_fp16_max_abs_error_vs_fp32"] < 0.05
    assert report["denoiser_error_fp16_max_rel_error_vs_fp32"] < 0.02


def test_conditioning_path_is_the_timestep_and_class_embedding(bundle):
    graph = onnx.load(str(bundle.denoiser_path)).graph
    names = set(conditioning_nodes(graph))
    ops = {n.op_type for n in graph.node if n.name in names}
    assert {"Sin", "Cos", "Gemm"} <= ops  # sinusoidal embedding and its MLP
    assert "Conv" not in ops and "InstanceNormalization" not in ops


def test_refuses_to_overwrite_its_source(bundle):
    with pytest.raises(BundleError, match="must differ"):
        export_bundle(bundle.path, bundle.path)


def test_opset_below_17_is_refused(bundle, tmp_path):
    with pytest.raises(ValueError, match="opset 16"):
        export_bundle(bundle.path, tmp_path / "b", opset=16, fused=False, fp16=False)


def test_fp32_and_fp16_backends_decide_alike_on_generated_cells(exported):
    new, _ = exported
    fp32 = OnnxRuntimeBackend(new, threads=1)
    fp16 = OnnxRuntimeBackend(new, threads=1, model_path=new.network_path("denoiser_fp16"))
    assert 0 < max_abs_error(fp32, fp16, new) < 0.05
    cells = random_cells(new, 4)
    agreement = decision_agreement(cells, new, fp32, fp16, reference_classifier(n_trials=20))
    assert agreement.cells == 4 and agreement.rate == 1.0


def test_decision_agreement_counts_disagreements(bundle, ort_backend):
    """The estimator is a parameter: one that reads the backend's name disagrees where names differ."""
    class Renamed:
        name, max_batch = "other", 256

        def predict_noise(self, *a):
            return ort_backend.predict_noise(*a)

    cells = random_cells(bundle, 3)
    by_name = lambda batch, b, backend: np.full(len(batch), 0 if backend.name == "other" else 1)  # noqa: E731
    result = decision_agreement(cells, bundle, ort_backend, Renamed(), by_name)
    assert result.agreeing == 0 and result.to_dict()["disagreeing_cells"] == [0, 1, 2]


def test_export_command_validates_decisions_on_labelled_cells(bundle, tmp_path, capsys):
    """`cytoedge export --validate-data`: generated labelled crops, decisions of ONNX vs PyTorch and FP16 vs FP32."""
    import json

    import cv2

    from cytoedge.runtime.cli import main

    rng = np.random.default_rng(5)
    side = random_cells(bundle, 1).tiles[0].shape[0] * 3  # crops at the training crops' scale
    for name in bundle.class_names:
        (tmp_path / "cells" / name).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "cells" / name / "a.png"), rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    assert main(["export", "--out", str(tmp_path / "b"), "--no-fused", "--batches", "1,8", "--validate-data",
                 str(tmp_path / "cells"), "--per-class", "1", "--estimator", "reference", "--trials", "10",
                 "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("onnx_vs_torch_decisions", "fp16_vs_fp32_decisions"):
        assert report[key]["cells"] == len(bundle.class_names)
        assert report[key]["agreement"] == 1.0
