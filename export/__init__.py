"""cytoedge stage package."""
