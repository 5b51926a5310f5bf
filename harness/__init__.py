"""Benchmarking harness for the claims of large-batch super-convergence (Smith & Topin)."""

__version__ = "0.1.0"
