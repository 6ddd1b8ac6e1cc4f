"""How far the error features can go on a new site: linear heads over every class's errors, on BCCD.

  python benchmarks/bench_site_heads.py [--model BUNDLE ...] [--draws 10] [--write]

`cytoedge adapt --method features` keeps the race and refits per-class offsets; on BCCD it reaches
about 0.68-0.70 balanced accuracy at 20 cells a class (RESULTS.md, "Site robustness"). This asks
whether a richer map of the same features would do better, before anything is built for it: each
BCCD field with one white cell is read as `adapt --fields` reads it, every class's error is measured
under the calibration's 16 candidate probes (no elimination), and a multinomial logistic regression
(L2) is fitted on k fields per class (k = 5, 10, 20, at most half of a class; several random draws)
and measured on the other fields. Three feature sets: log errors; log errors less the null class's
(a likelihood ratio per probe, which cancels how hard a cell is to denoise); log errors less their
mean over the classes. Nothing is written to the repository but RESULTS.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from bench_site import bccd_labels
from cytoedge.calibration.metrics import balanced_accuracy
from results_md import write_section

K_SHOTS = (5, 10, 20)
L2_STRENGTHS = (0.1, 1.0)  # inverse regularisation C, as in common logistic-regression APIs


def bccd_errors(model: Path, root: Path, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """``E [N, K+1, P]`` and labels of the BCCD fields in which `score` finds one white cell."""
    from cytoedge.calibration.artefact import DEFAULT_CANDIDATES, candidate_probes
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.commands.calibrate import measure_errors
    from cytoedge.runtime.estimator import noise_bank
    from cytoedge.runtime.site_cells import field_cells
    from cytoedge.runtime.slide_scoring import ScoringOptions

    bundle = ModelBundle.load(model)
    backend = OnnxRuntimeBackend(bundle, threads=threads)
    labels = bccd_labels(root)
    files = [root / "images" / f"{n}.jpg" for n in sorted(labels) if labels[n] in bundle.class_names]
    files = [f for f in files if f.is_file()]
    ys = np.array([bundle.class_names.index(labels[f.stem]) for f in files])
    cells = field_cells(files, ys, bundle, backend, ScoringOptions(heatmaps=False))
    probes = candidate_probes(DEFAULT_CANDIDATES["timesteps"], DEFAULT_CANDIDATES["replicas"])
    noise = noise_bank(bundle, len(probes), DEFAULT_CANDIDATES["noise_seed"])
    E = measure_errors(bundle, backend, cells.batches, len(cells.labels), probes, noise)
    backend.close()
    return E, cells.labels


def fit_logistic(X: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression with an L2 penalty ``1/(2C)·|W|²`` (mean loss), by L-BFGS."""
    classes = np.unique(y)
    Y = (y[:, None] == classes[None]).astype(float)
    n, d = X.shape
    k = len(classes)

    def loss(w):
        W, b = w[:d * k].reshape(d, k), w[d * k:]
        Z = X @ W + b
        Z -= Z.max(1, keepdims=True)
        P = np.exp(Z)
        P /= P.sum(1, keepdims=True)
        G = (P - Y) / n
        nll = -(Y * np.log(P + 1e-12)).sum() / n + 0.5 / (C * n) * (W ** 2).sum()
        return nll, np.concatenate([(X.T @ G + W / (C * n)).ravel(), G.sum(0)])

    w = minimize(loss, np.zeros(d * k + k), jac=True, method="L-BFGS-B", options={"maxiter": 500}).x
    return classes, w[:d * k].reshape(d, k), w[d * k:]


def feature_sets(E: np.ndarray) -> dict[str, np.ndarray]:
    logs = np.log(E)
    k = E.shape[1] - 1
    return {"log errors": logs.reshape(len(E), -1),
            "log errors − null's": (logs[:, :k] - logs[:, k:]).reshape(len(E), -1),
            "log errors − class mean": (logs[:, :k] - logs[:, :k].mean(1, keepdims=True)).reshape(len(E), -1)}


def k_shot(X: np.ndarray, y: np.ndarray, k: int, C: float, draws: int) -> list[float]:
    out = []
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        fit = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:min(k, int((y == c).sum()) // 2)]
                              for c in np.unique(y)])
        rest = np.setdiff1d(np.arange(len(y)), fit)
        mu, sd = X[fit].mean(0), X[fit].std(0) + 1e-6
        classes, W, b = fit_logistic((X[fit] - mu) / sd, y[fit], C)
        out.append(balanced_accuracy(y[rest], classes[(((X[rest] - mu) / sd) @ W + b).argmax(1)], int(y.max()) + 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, action="append", default=None, help="bundle(s) to measure (default: the bundled one)")
    p.add_argument("--bccd", type=Path, default=Path("../shared/data/bccd"))
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.bundle import ModelBundle

    lines = ["| model | features | C | " + " | ".join(f"k = {k}" for k in K_SHOTS) + " |",
             "|---|---|---|" + "---|" * len(K_SHOTS)]
    classes_line = ""
    for model in args.model or [default_bundle_path()]:
        bundle = ModelBundle.load(model)
        names = bundle.class_names
        E, y = bccd_errors(model, args.bccd, args.threads)
        keep = np.isin(y, [c for c in np.unique(y) if (y == c).sum() >= 10])  # BCCD's lone basophil cannot be split
        E, y = E[keep], y[keep]
        classes_line = ", ".join(f"{names[c]} ({int((y == c).sum())})" for c in np.unique(y))
        zero = balanced_accuracy(y, np.log(E[:, :len(names)]).mean(2).argmin(1), len(names))
        lines.append(f"| `{bundle.name}` | none: lowest mean log error (zero-shot) | | {zero:.3f} |"
                     + " |" * (len(K_SHOTS) - 1))
        for what, X in feature_sets(E).items():
            for C in L2_STRENGTHS:
                cells = []
                for k in K_SHOTS:
                    acc = k_shot(X, y, k, C, args.draws)
                    cells.append(f"{np.mean(acc):.3f} ± {np.std(acc):.3f}")
                lines.append(f"| `{bundle.name}` | {what} | {C} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    body = (f"BCCD trainval fields with one white cell found ({classes_line}), every class's "
            f"error under the 16 candidate probes; a logistic regression fitted on k fields a class, balanced "
            f"accuracy on the other fields (mean ± sd over {args.draws} draws).\n\n" + "\n".join(lines) + "\n")
    print(body)
    if args.write:
        write_section("site-heads", "Site robustness: linear heads over the error features (BCCD)", body)


if __name__ == "__main__":
    main()
