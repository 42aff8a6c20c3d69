"""Embedders: OpenAI-compatible text embeddings, local open_clip/transformers models, micro-batching."""
