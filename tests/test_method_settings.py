"""Each method owns its settings: editing one method's settings changes the stamps (what DVC reruns, see
moeclip/bench/stages/stamps.py) of the stage calls that run that method and of no other.

A profile's `model` is MoECLIP's settings (its network and its training objective), a baseline's
`methods.<method>.model` that baseline's, and a `train` section only the generic optimisation settings
(moeclip/config.py). Each call's stamp holds the values of the params.yaml keys its stage declares; edits are
made to the text, as a user makes them, so YAML merge keys (`<<: *demo_train`) carry them wherever they are
merged. tests/test_dvc_pipeline.py checks the same edits through `dvc status` on a reproduced demo.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from moeclip.bench.baselines import method_runs
from moeclip.bench.experiments import Benchmark, load_plan
from moeclip.bench.params import ParamsError, Profile, load_profile
from moeclip.bench.stages import STAGES, plan_calls
from moeclip.bench.stages.stamps import call_stamps
from moeclip.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "demo"  # the profile dvc.yaml runs (params.yaml `profile:`)
GENERIC_TRAINING = {"epochs", "batch_size", "lr", "betas", "weight_decay", "milestones", "gamma", "seed", "augment",
                    "num_workers", "checkpoint_every", "max_steps"}


def _lookup(document: dict, key: str) -> object:
    value = document
    for part in key.split("."):
        value = value[part]
    return value


def _no_code(_: object) -> dict[str, dict]:
    """Settings alone: the code part of a stamp is not edited here."""
    return {stage.name: {} for stage in STAGES}


def _settings(params: Path) -> dict[str, dict]:
    """Each call's settings, as its stamp holds them."""
    return {label: stamp["params"] for label, stamp in call_stamps(params, PROFILE, _no_code)[1].items()}


def _in_profile(text: str, old: str, new: str) -> str:
    """params.yaml's text with `old` replaced by `new` inside the demo profile's section, where it occurs once."""
    start = text.index(f"\n  {PROFILE}:\n")
    end = next((match.start() for match in re.finditer(r"\n {0,2}\S", text) if match.start() > start), len(text))
    section = text[start:end]
    assert section.count(old) == 1, f"{old!r} is not in profile '{PROFILE}' once"
    return text[:start] + section.replace(old, new) + text[end:]


# Each edit of the demo profile: the text edit, a check that the edited profile holds it (and only it), and the
# stages whose params it must change.
def _moeclip_edit(text: str) -> str:
    return _in_profile(text, "    model:\n      <<: *paper_model\n", "    model:\n      <<: *paper_model\n"
                                                                      "      lambda_etf: 0.02\n")


def _moeclip_holds(benchmark: Benchmark, profile: Profile) -> None:
    assert profile.model.lambda_etf == 0.02
    assert all(run.model.focal_gamma == 2.0 for run in method_runs(benchmark, profile, "april_gan"))


def _baseline_edit(text: str) -> str:
    return _in_profile(text, "model: {<<: *april_gan_paper, ", "model: {<<: *april_gan_paper, focal_gamma: 3.0, ")


def _baseline_holds(benchmark: Benchmark, profile: Profile) -> None:
    assert all(run.model.focal_gamma == 3.0 for run in method_runs(benchmark, profile, "april_gan"))
    assert all(run.model.focal_gamma == 2.0 for run in method_runs(benchmark, profile, "anomalyclip"))
    assert profile.model.focal_gamma == 2.0


def _generic_edit(text: str) -> str:
    return _in_profile(text, "      batch_size: 8\n", "      batch_size: 4\n")


def _generic_holds(benchmark: Benchmark, profile: Profile) -> None:
    assert profile.train.batch_size == 4
    assert all(run.train.batch_size == 4 for method in ("april_gan", "anomalyclip", "wmoe_clip", "adaclip", "aa_clip",
                                                        "bayes_pfl")
               for run in method_runs(benchmark, profile, method))


def _moeclip_stages(benchmark: Benchmark) -> set[str]:
    """The stages that run MoECLIP's settings (the trainings and experiments), and the report, whose banner reads
    the profile's model and train sections."""
    return {*(f"train@{auxiliary}" for auxiliary in benchmark.main.targets),
            *(f"experiment@{key}" for key in benchmark.experiments), "report"}


EDITS: dict[str, tuple[Callable[[str], str], Callable[[Benchmark, Profile], None],
                       Callable[[Benchmark], set[str]]]] = {
    # A MoECLIP-only setting: MoECLIP's stages, no baseline.
    "moeclip lambda_etf": (_moeclip_edit, _moeclip_holds, _moeclip_stages),
    # A baseline's own setting: its stage alone (the report reads only the methods' labels).
    "april_gan focal_gamma": (_baseline_edit, _baseline_holds, lambda benchmark: {"baseline@april_gan"}),
    # The control: a generic training setting the baselines' `train` merge (`<<: *demo_train`) reaches them, so
    # the comparison does see a baseline stage depending on an edit; WinCLIP trains nothing and keeps its results.
    "generic batch_size": (_generic_edit, _generic_holds, lambda benchmark: _moeclip_stages(benchmark) | {
        "baseline@april_gan", "baseline@anomalyclip", "baseline@wmoe_clip", "baseline@adaclip",
        "baseline@aa_clip", "baseline@bayes_pfl"}),
}


@pytest.mark.parametrize("edit", EDITS)
def test_an_edit_to_one_methods_settings_invalidates_only_the_stages_that_run_it(tmp_path, edit):
    change, holds, expected = EDITS[edit]
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = _settings(params)
    params.write_text(change(params.read_text()))
    benchmark, profile = load_plan(params, PROFILE)
    holds(benchmark, profile)
    after = _settings(params)
    assert set(after) == set(before)
    changed = {label for label in after if after[label] != before[label]}
    assert changed == expected(benchmark), (f"{edit}: unexpected {sorted(changed - expected(benchmark))}, "
                                            f"missing {sorted(expected(benchmark) - changed)}")


def test_the_training_section_is_generic_and_a_loss_setting_there_is_refused_naming_it(tmp_path):
    assert set(TrainConfig.model_fields) == GENERIC_TRAINING
    text = (ROOT / "params.yaml").read_text()
    old_layout = tmp_path / "params.yaml"
    old_layout.write_text(_in_profile(text, "      batch_size: 8\n", "      batch_size: 8\n      lambda_etf: 0.02\n"))
    with pytest.raises(ParamsError, match=r"profile 'demo' in '.*' is invalid: train\.lambda_etf: extra inputs are "
                                          r"not permitted; methods\.april_gan\.train\.lambda_etf: extra"):
        load_profile(old_layout, PROFILE)


def test_every_declared_params_key_exists_in_every_profile():
    """A stamp takes a missing key as null, so a setting added later would not count as a change: every profile
    (`dvc exp run -S profile=...`) holds every key the stages declare."""
    document = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in document["profiles"]:
        benchmark, _ = load_plan(ROOT / "params.yaml", name)
        for stage, args in plan_calls(benchmark):
            for key in stage.params_keys(name, args):
                try:
                    _lookup(document, key)
                except KeyError:
                    pytest.fail(f"profile '{name}': stage {stage.label(args)} declares '{key}', which is missing")
