"""Model loading: the embedded GGUF, Hugging Face ids and local folders, behind one bridge."""
