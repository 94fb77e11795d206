"""Bytes on disk: safetensors files (checked headers, a tensor at a time), content hashes,
Hugging Face model directories, result tables, and `storage/`: a repository's index
(SQLite or PostgreSQL) and object store (a directory or S3)."""
