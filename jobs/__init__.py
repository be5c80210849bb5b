"""jobs: entry points only (the `w2w` CLI, Ray job entrypoints, pretraining scripts)."""
