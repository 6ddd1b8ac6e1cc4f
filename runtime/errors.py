"""Exceptions of cytoedge. Each message names the input, what was wrong, and how to fix it."""
from __future__ import annotations


class CytoedgeError(Exception):
    """Base class: anything cytoedge refuses on purpose."""


class BundleError(CytoedgeError):
    """A model bundle is missing, malformed, tampered with, or incompatible."""


class InputImageError(CytoedgeError):
    """An input image cannot be read or has the wrong shape or type."""


class BackendError(CytoedgeError):
    """A denoiser backend cannot be created or returned unusable numbers."""


class CalibrationError(CytoedgeError):
    """Calibration is missing, malformed, or cannot be fitted from the given data."""
