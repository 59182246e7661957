"""Example pipelines to copy. ``modalkit.examples.sentiment`` is the one the default ``modalkit.yaml`` serves."""
