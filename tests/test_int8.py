"""INT8 denoiser: which convolutions stay FP32, the graph `cytoedge quantize` writes, and when it may run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cytoedge.export.int8_selection import choose_fp32_convs, predicted_shift, score_shift
from cytoedge.export.quantize import conv_macs
from cytoedge.runtime.backends.select import create_backend, int8_availability
from cytoedge.runtime.bundle import MANIFEST, ModelBundle, write_manifest
from cytoedge.runtime.errors import BackendError


def test_choose_fp32_convs_works_on_the_probe_furthest_over_budget():
    # per probe (first, second): a hurts the first probe, b the second, c little anywhere, d is expensive
    shift = {"a": [0.10, 0.01], "b": [0.01, 0.06], "c": [0.01, 0.01], "d": [0.04, 0.0]}
    macs = {"a": 10, "b": 1, "c": 1, "d": 1000}
    # start (0.109, 0.062): first probe worst → a (1e-3/MAC beats d's 1.6e-6); then (0.042, 0.061): second → b
    assert choose_fp32_convs(shift, macs, 0.05) == ["a", "b"]
    assert predicted_shift(shift, ["a", "b"]) == pytest.approx([np.sqrt(0.01 ** 2 + 0.04 ** 2), 0.01])
    assert choose_fp32_convs(shift, macs, 1.0) == []
    assert sorted(choose_fp32_convs(shift, macs, 0.0)) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="different convolutions"):
        choose_fp32_convs(shift, {"a": 1}, 0.05)


def test_score_shift_follows_the_running_scores_and_ignores_shifts_common_to_all_classes():
    rng = np.random.default_rng(0)
    ref = rng.uniform(1, 2, (5, 4, 2))  # cells, classes, probes
    assert score_shift(ref + rng.normal(size=(5, 1, 2)), ref, 2.0) == pytest.approx([0.0, 0.0], abs=1e-12)
    moved = ref.copy()
    moved[:, 0, 0] += 0.4  # first probe, one class of four: centred changes 0.3, -0.1, -0.1, -0.1
    moved[:, 0, 1] -= 0.4  # the second probe undoes it: the running score after two probes is unchanged
    assert score_shift(moved, ref, 2.0) == pytest.approx([np.sqrt((0.09 + 3 * 0.01) / 4) / 2.0, 0.0])


def test_conv_macs_sizes_convolutions_after_a_resize(tmp_path):
    """Conv 3→4 (3×3, 8×8) → Resize ×2 → Conv 4→2 (1×1, 16×16): MACs from the real output sizes."""
    w1 = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w1")
    w2 = numpy_helper.from_array(np.zeros((2, 4, 1, 1), np.float32), "w2")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["h", "", "scales"], ["u"], name="up", mode="nearest"),
             helper.make_node("Conv", ["u", "w2"], ["y"], name="c2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2, None, None])],
                              [w1, w2, scales])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert conv_macs(path, {"x": np.zeros((3, 3, 8, 8), np.float32)}) == {"c1": 4 * 3 * 9 * 64, "c2": 2 * 4 * 256}


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory, bundle, crop_files):
    """The model-drawn cells as a labelled folder DIR/<class>/<image>."""
    root = tmp_path_factory.mktemp("labelled")
    for path in crop_files:
        name = next(c for c in bundle.class_names if path.stem.endswith(c))
        (root / name).mkdir(exist_ok=True)
        shutil.copy(path, root / name / path.name)
    return root


def test_quantize_command_writes_a_checked_int8_graph_and_only_a_passed_one_runs(bundle, labelled_dir, tmp_path, capsys):
    from cytoedge.runtime.cli import main

    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    candidates = ["/mid.1/qkv/Conv", "/up.4.0/conv2/Conv"]
    rc = main(["quantize", "--model", str(copy), "--data", str(labelled_dir), "--per-class", "2", "--check",
               str(labelled_dir), "--convs", ",".join(candidates), "--max-score-shift", "1e9", "--threads", "2"])
    out = capsys.readouterr().out
    b = ModelBundle.load(copy)
    net = b.manifest["networks"]["denoiser_int8"]
    q, check = net["quantization"], net["decision_check"]
    # the verdict recomputed here, independently of decision_agreement: the fast estimator's class per
    # check cell through the FP32 and the INT8 graph
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.cells import crops_to_batch, declared_um_per_px, read_crop
    from cytoedge.runtime.classify_cells import score_cells_fast

    files = sorted(labelled_dir.rglob("*.png"))
    batch = crops_to_batch([read_crop(f) for f in files], b, [declared_um_per_px(f) for f in files])
    fp32, int8 = OnnxRuntimeBackend(b, threads=1), OnnxRuntimeBackend(b, threads=1, precision="int8",
                                                                       model_path=b.network_path("denoiser_int8"))
    agreeing = int((score_cells_fast(batch, b, fp32).decisions.class_id ==
                    score_cells_fast(batch, b, int8).decisions.class_id).sum())
    assert (check["cells"], check["agreeing"]) == (len(files), agreeing)
    assert check["passed"] == (agreeing / len(files) >= check["bar"]) and rc == (0 if check["passed"] else 1)
    assert "INT8" in out
    assert sorted(q["score_shift_per_conv"]) == sorted(candidates)
    assert set(q["fp32_convs"]) == set(q["macs_per_conv"]) - set(candidates)  # budget 1e9: both candidates INT8
    probes = len(b.calibration.probes)
    assert len(q["measured_score_shift"]) == probes and max(q["measured_score_shift"]) > 0
    assert all(len(v) == probes and max(v) > 0 for v in q["score_shift_per_conv"].values())
    assert check["cells"] == 2 * len(b.class_names) and check["bar"] == 0.995
    graph = onnx.load(str(b.network_path("denoiser_int8"))).graph
    producers = {o: n for n in graph.node for o in n.output}
    int8 = sorted(n.name for n in graph.node if n.op_type == "Conv"
                  and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "DequantizeLinear")
    assert int8 == sorted(candidates)

    # A graph that passed runs under its own name; one that failed (or is stale) is refused with the reason.
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["networks"]["denoiser_int8"]["decision_check"]["passed"] = True
    write_manifest(copy, manifest)
    backend = create_backend(ModelBundle.load(copy), "onnxruntime-cpu-int8", threads=1)
    assert backend.name == "onnxruntime-cpu-int8"
    x = np.random.default_rng(0).standard_normal((2, 3, b.input_size, b.input_size)).astype(np.float32)
    assert backend.predict_noise(x, np.array([10, 500]), np.array([0, 3])).shape == x.shape
    manifest["networks"]["denoiser_int8"]["decision_check"]["passed"] = False
    write_manifest(copy, manifest)
    with pytest.raises(BackendError, match="did not pass its decision check"):
        create_backend(ModelBundle.load(copy), "onnxruntime-cpu-int8")
    manifest["networks"]["denoiser_int8"]["decision_check"]["passed"] = True
    calibration = copy / manifest["calibration"]
    calibration.write_text(json.dumps({**json.loads(calibration.read_text()), "temperature": 1.5}))  # recalibrated
    write_manifest(copy, manifest)
    assert "recalibrated after" in int8_availability(ModelBundle.load(copy)).reason
    manifest["networks"]["denoiser_int8"]["source_sha256"] = "0" * 64
    write_manifest(copy, manifest)
    assert "another FP32 graph" in int8_availability(ModelBundle.load(copy)).reason


def test_quantize_command_names_an_unknown_convolution(bundle, labelled_dir, tmp_path, capsys):
    from cytoedge.runtime.cli import main

    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    assert main(["quantize", "--model", str(copy), "--data", str(labelled_dir), "--per-class", "1", "--check",
                 str(labelled_dir), "--convs", "/no/such/Conv"]) == 2
    assert "no Conv node named ['/no/such/Conv']" in capsys.readouterr().err


def test_int8_backend_is_refused_for_a_bundle_without_an_int8_graph(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    net = manifest["networks"].pop("denoiser_int8", None)
    if net:
        del manifest["files"][net["file"]]
        (copy / net["file"]).unlink()
    write_manifest(copy, manifest)
    with pytest.raises(BackendError, match="cytoedge quantize"):
        create_backend(ModelBundle.load(copy), "onnxruntime-cpu-int8")
