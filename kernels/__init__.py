"""Batched preprocessing: cut, resample and normalise model inputs for many cells at once.

``prepare_batch`` is the entry point the pipeline calls; it runs on the CPU here (see cell_batch).
"""
from cytoedge.kernels.cell_batch import CELL_FIELDS, ColourTransform, cell_table
from cytoedge.kernels.cell_batch import prepare_batch_opencv_loop as prepare_batch

__all__ = ["CELL_FIELDS", "ColourTransform", "cell_table", "prepare_batch"]
