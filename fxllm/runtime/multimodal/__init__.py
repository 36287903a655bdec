"""Multimodal inputs: processing images into placeholder tokens and pixel values (with a cache),
and turning them into the embeddings the language model reads."""
