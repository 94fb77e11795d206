"""Bytes on disk: safetensors files (checked headers, a tensor at a time), content hashes,
Hugging Face model directories, result tables."""
