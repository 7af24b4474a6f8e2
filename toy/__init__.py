"""The toy tabular world (``toy.world``) and the reproduction experiments run by ``python -m toy``."""
