"""Stage `analysis`: expert utilisation per dataset, inter-expert similarity, routed-patch statistics
(Figs. 5/10 and 9, Table 14) of the main model."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from torch.utils.data import DataLoader

from moeclip.analysis import expert_utilisation, inter_expert_similarity, routed_patch_statistics
from moeclip.atomic import atomic_path
from moeclip.bench.experiments import Benchmark
from moeclip.bench.params import Profile
from moeclip.bench.stages.common import computing_plan, write_json
from moeclip.bench.stages.trained import main_checkpoint
from moeclip.bench.workflows import read_manifests
from moeclip.checkpoint import load_model
from moeclip.errors import MoeclipError
from moeclip.runtime import resolve_device


def datasets(benchmark: Benchmark, profile: Profile) -> set[str]:
    """The test sets the analysis reads (besides the main training)."""
    return {*benchmark.main.targets[benchmark.main.auxiliary], profile.analysis.similarity_dataset,
            profile.analysis.statistics_dataset}


def run(params: Path, profile_name: str | None = None) -> Path:
    benchmark, profile = computing_plan(params, profile_name)
    auxiliary = benchmark.main.auxiliary
    missing = [str(profile.layout.manifest(d)) for d in sorted(datasets(benchmark, profile))
               if not profile.layout.manifest(d).is_file()]
    if missing:
        raise MoeclipError(f"the analysis reads manifest(s) {', '.join(missing)}: run `dvc repro prepare` first")
    model, _ = load_model(main_checkpoint(profile, auxiliary), resolve_device(profile.device))
    layer = profile.analysis.layer
    if str(layer) not in model.moe:
        raise MoeclipError(f"analysis layer {layer} of profile '{profile.name}' carries no MoE "
                           f"(MoE layers: {sorted(int(k) for k in model.moe)})")
    out = profile.layout.analysis()
    utilisation = pd.concat(
        [expert_utilisation(model, _loader(profile, model, dataset), [layer]).assign(dataset=dataset)
         for dataset in benchmark.main.targets[auxiliary]], ignore_index=True)
    similarity = inter_expert_similarity(model, _loader(profile, model, profile.analysis.similarity_dataset), layer)
    statistics = routed_patch_statistics(model, _loader(profile, model, profile.analysis.statistics_dataset), layer)
    with atomic_path(out / "utilisation.csv") as temporary:
        utilisation.to_csv(temporary, index=False)
    with atomic_path(out / "routed_statistics.csv") as temporary:
        statistics.to_csv(temporary, index=False)
    matrix = [[None if v != v else float(v) for v in row] for row in similarity]  # NaN (unused expert) -> null
    write_json(out / "similarity.json", {"layer": layer, "dataset": profile.analysis.similarity_dataset,
                                         "matrix": matrix})
    return out


def _loader(profile: Profile, model, dataset: str) -> DataLoader:
    frame = read_manifests({dataset: profile.layout.manifest(dataset)})
    return DataLoader(model.inputs(frame), batch_size=profile.runtime.eval_batch_size)
