"""Serve the `zsad-benchmark` flow to a Prefect server: `python -m pipelines.deploy` (from the repository root).

Registers the deployments `zsad-benchmark/demo`, `/paper-smoke` and `/paper` and runs what is
triggered (`prefect deployment run zsad-benchmark/demo`) in this process's working directory,
one flow run at a time, since runs of one checkout share its data and runs folders. For
workers on several machines, see prefect.yaml instead.
"""
from __future__ import annotations

from prefect import serve
from prefect.types.entrypoint import EntrypointType

from pipelines.flow import zsad_benchmark

DEPLOYMENTS = {
    "demo": "The offline demo profile: synthetic datasets and a tiny ViT, minutes on a CPU.",
    "paper-smoke": "The paper's profile at its real size with one step per training and one class per "
                   "synthetic dataset: run it before `paper` (86 minutes on a 2-core CPU, minutes on a GPU).",
    "paper": "The paper's profile: real datasets and ViT-L-14-336, needs a GPU.",
}


def main() -> None:
    """Serve every deployment until interrupted."""
    serve(*(zsad_benchmark.to_deployment(name, parameters={"profile": name}, description=description,
                                         entrypoint_type=EntrypointType.MODULE_PATH)
            for name, description in DEPLOYMENTS.items()), limit=1)


if __name__ == "__main__":
    main()
