"""Prefect flows: orchestration only (batch_inference, replay_failures)."""
