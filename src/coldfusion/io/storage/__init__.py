"""Where a repository keeps its index and its objects.

- `settings`: ROOT/storage.json, which names shared storage (absent: everything under ROOT);
- `index`: the index's connection, SQLite (a file under ROOT) or PostgreSQL (shared);
- `objects`: content-addressed files, in a directory or in an S3 bucket (with a local cache).

Several service replicas, each with its own ROOT holding the same storage.json, share one
repository: one index, one bucket.
"""
