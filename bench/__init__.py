"""bams3 benchmark harness. Run ``python -m bench`` (see bench/README.md)."""
