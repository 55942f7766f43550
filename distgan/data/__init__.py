"""Data: embedded real datasets, shard writing and the streaming training pipeline."""
