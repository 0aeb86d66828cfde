"""Renderers: results in, text/JSON/PNG/HTML out. Nothing here computes an analysis."""
