"""The parts of scripts/bench.py: the workload, the ways to move it, the wire, the results."""
