"""opd_mini: a small, exact reference implementation of on-policy distillation."""

__version__ = "0.1.0"
