"""Analyses: free functions over a :class:`~hexray.tracing.engine.Trace` returning frozen results."""
