"""Prefect tasks: thin wrappers over modalkit's batch engine (the logic lives in ``modalkit.batch`` and
``modalkit.runners``)."""
