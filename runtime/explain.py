"""The explain stage: counterfactual heatmaps (runtime/heatmap.py) for a slide's flagged cells.

Which cells are explained is a budget: flagged cells (abnormal, uncertain or anomalous) or all of them,
up to ``max_heatmaps`` per slide in the order they are scored. The maps reuse the cuts the estimator
made of the batch (``CellBatch.inputs``), and are drawn on each cell's view as scanned.
"""
from __future__ import annotations

import numpy as np

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cell_views import CellView, heatmap_overlay, mass_inside, png_bytes
from cytoedge.runtime.cells import CellBatch
from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.heatmap import HeatmapPlan, counterfactual_heatmaps
from cytoedge.runtime.slide_pictures import SlidePictures

FLAGS = ("abnormal", "uncertain", "anomalous")


class HeatmapExplainer:
    """Explains a classified batch's cells into a slide's pictures; ``plan`` None: the cells get their
    turn but no map (a latent bundle's errors have no pixel to point at)."""

    def __init__(self, bundle: ModelBundle, backend: DenoiserBackend, plan: HeatmapPlan | None, which: str,
                 max_per_slide: int):
        if which not in ("flagged", "all"):
            raise CytoedgeError(f"heatmap_cells {which!r}: choose 'flagged' or 'all'")
        self.bundle, self.backend, self.plan, self.which, self.max_per_slide = bundle, backend, plan, which, max_per_slide
        self._colour = bundle.colour_transform()
        self.cut_count = 0  # cells the heatmaps had to cut beyond the estimator's cuts

    def explain(self, batch: CellBatch, scored: list[tuple[int, dict]], views: list[CellView | None],
                pictures: SlidePictures) -> None:
        """``scored``: (row in ``batch``, record) of the batch's cells; adds each explained record's
        "heatmap" block and the map and overlay to ``pictures``."""
        chosen = [(i, r) for i, r in scored if self.which == "all" or any(r["flags"].get(k) for k in FLAGS)]
        chosen = chosen[:max(0, self.max_per_slide - len(pictures.explained))]
        pictures.explained.update(r["id"] for _, r in chosen)
        if not chosen or self.plan is None:
            return
        names = self.bundle.class_names
        sub = batch.subset(np.array([i for i, _ in chosen]))
        pred = np.array([names.index(r["class"]) for _, r in chosen])
        runner = np.array([names.index(r["runner_up"]) for _, r in chosen])
        maps = counterfactual_heatmaps(sub, pred, runner, self.bundle, self.backend, self.plan, self._colour)
        self.cut_count += sub.cut_count
        for (i, r), m in zip(chosen, maps):
            mask = views[i].mask
            pictures.heatmaps[r["id"]] = m
            pictures.overlays[r["id"]] = png_bytes(heatmap_overlay(m, mask))
            r["heatmap"] = {"runner_up": r["runner_up"], "timesteps": self.plan.timesteps.tolist(),
                            "plan": self.plan.source, "mean_gain": round(float(m.mean()), 6),
                            "inside_cell_fraction": round(mass_inside(m, mask), 4),
                            "nfe": int(2 * len(self.plan.timesteps))}
