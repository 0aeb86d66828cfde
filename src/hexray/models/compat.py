"""Fixes for known mismatches between the pinned libraries, applied to one loaded bridge only.

Each fix is scoped to the instances of one model (never a global monkey-patch) and is a no-op
where the mismatch is absent, so an upgrade that fixes the library upstream changes nothing.
"""

from __future__ import annotations

from typing import Any


def accept_renamed_kv_cache(bridge) -> int:
    """Let the bridge's attention see the KV cache under transformers' new name; returns how many.

    transformers 5.24 renamed the decoder layers' ``past_key_values=`` argument to ``cache=``.
    TransformerLens 4.3's attention bridges still look for ``past_key_values`` (or
    ``layer_past``), find nothing and skip the cache update, so every cached step attends to its
    own token alone: generation silently ignores the prompt.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    patched = 0
    for module in bridge.modules():
        if isinstance(module, AttentionBridge) and not getattr(module, "_hexray_cache_alias", False):
            module._update_kv_cache = _aliasing(module._update_kv_cache)
            module._hexray_cache_alias = True
            patched += 1
    return patched


def _aliasing(update):
    def update_kv_cache(k, v, **kwargs: Any):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs.pop("cache")
        return update(k, v, **kwargs)

    return update_kv_cache
