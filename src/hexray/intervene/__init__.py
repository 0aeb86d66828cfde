"""Causal interventions: ablation and activation patching, batched."""
