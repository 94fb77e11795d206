"""The multitask-learning baseline: one body, one head per task, batches from a sampler."""
