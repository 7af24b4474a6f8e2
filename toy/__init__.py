"""The toy tabular world (:mod:`toy.world`) and the reproduction experiments run by ``python -m toy``."""
