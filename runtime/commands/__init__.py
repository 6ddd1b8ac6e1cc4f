"""Sub-commands of the cytoedge CLI (see runtime/cli.py)."""
