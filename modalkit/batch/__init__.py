"""The batch engine, pure of Prefect and of any runtime: dataset listing and chunk planning (planning), input
format plug-ins (formats), output writers (writers), every output path (layout), process_chunk (chunk), queue
records in flight (queueing), the job's checks, resume and manifest (job), replay (replay). Where chunks run is
:mod:`modalkit.runners`; the Prefect flow in ``flows/batch_inference.py`` only orchestrates."""
