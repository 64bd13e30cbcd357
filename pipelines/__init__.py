"""Prefect orchestration of the benchmark: the `zsad-benchmark` flow runs the stages of moeclip/bench/pipeline.py
(the functions dvc.yaml runs) as tasks, with retries, caching and a per-dataset fan-out."""
