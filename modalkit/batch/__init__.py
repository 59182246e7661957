"""The batch engine, pure of Prefect: listing, chunk planning, record readers and writers, process_chunk,
manifests. The Prefect flow in ``flows/batch_inference.py`` only orchestrates these."""
