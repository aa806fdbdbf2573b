"""A single-host container runtime that keeps containers in a form CRIU can checkpoint."""
