"""Encoders (any Hugging Face body plus a head we own) and how models are named."""
