"""Checkpoint formats: name mappings (shared with tools/convert_checkpoint.py) and sharded loading."""
