"""Prefect orchestration of the benchmark: the `zsad-benchmark` flow runs the stages declared in
moeclip/bench/stages/ (what dvc.yaml runs) as tasks, with retries, caching and a per-dataset fan-out."""
