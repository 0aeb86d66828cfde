"""Sparse dictionaries (SAEs, transcoders) and the tuned lens: what the model's parts represent."""
