"""The tracing engine and the site vocabulary (component labels <-> TransformerLens hook names)."""
