"""`coldfusion merge`: fuse finetuned checkpoints a practitioner already has (config, then run)."""
