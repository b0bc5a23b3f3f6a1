"""Prompt methods: trainable trees combined with the frozen backbone's input embeddings."""
