"""cytoedge runtime: slide sources, cells, denoiser backends, estimators, results."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cytoedge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
