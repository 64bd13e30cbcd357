"""params.yaml's benchmark plan: variants resolve onto profiles, training keys decide reuse, errors name the problem."""
from pathlib import Path

import pytest
import yaml

from moeclip.bench.experiments import experiment_runs, load_plan, main_run
from moeclip.bench.params import ParamsError, load_profile, read_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"

# SPEC.md section 10: every table and figure that needs its own runs.
SPEC_EXPERIMENTS = {"table2", "table5", "table6", "table7", "table8", "table9", "table10", "table11", "table12",
                    "table13", "fig6", "fig7"}


# SPEC.md sections 1-7: the paper's hyperparameters, which the paper profile must hold.
SPEC_MODEL = {"backbone": "ViT-L-14-336", "weights": "openai", "image_size": 518, "moe_layers": (6, 12, 18, 24),
              "num_experts": 4, "top_k": 2, "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.05,
              "lambda_moe": 0.1, "fofs": True, "expert_type": "lora", "router_type": "linear", "router_noise": 0.0,
              "paa_scales": (1, 3, 5), "image_adapter": True, "vanilla": False, "learnable_prompts": False,
              "precision": "fp32", "image_score": "paper", "output_layers": None,
              "blur_industrial": {"kernel_size": 7, "sigma": 1.0}, "blur_medical": {"kernel_size": 9, "sigma": 1.5},
              "focal_gamma": 2.0, "lambda_etf": 0.01, "lambda_bal": 0.01, "classification_loss": "bce",
              "expert_constraint": "etf", "dice": "paper", "focal": "paper", "release_compat": False}
SPEC_TRAIN = {"lr": 5e-4, "betas": (0.5, 0.999), "batch_size": 2, "epochs": 20, "milestones": (16000, 32000),
              "gamma": 0.5, "augment": True, "max_steps": None}


def test_params_hold_every_spec_experiment_and_the_papers_hyperparameters():
    benchmark, paper = load_plan(PARAMS, "paper")
    assert set(benchmark.experiments) == SPEC_EXPERIMENTS
    model, train = paper.model.model_dump(), paper.train.model_dump()
    assert {key: model[key] for key in SPEC_MODEL} == SPEC_MODEL
    assert {key: train[key] for key in SPEC_TRAIN} == SPEC_TRAIN
    assert len(benchmark.datasets) == 14
    assert benchmark.main.auxiliary == "visa"
    assert set(benchmark.main.targets["visa"]) == set(benchmark.datasets) - {"visa"}


def test_demo_profile_is_the_paper_with_a_tiny_backbone_and_reduced_sweeps():
    benchmark, demo = load_plan(PARAMS)
    assert demo.name == "demo" and demo.data.synthetic
    assert demo.model.backbone == "MoECLIP-Tiny-ViT" and demo.model.lora_rank == 8 and demo.model.lambda_etf == 0.01
    _, paper = load_plan(PARAMS, "paper")
    for name in benchmark.experiments:
        assert 1 <= len(experiment_runs(benchmark, demo, name)) <= len(experiment_runs(benchmark, paper, name))
    assert len(experiment_runs(benchmark, paper, "fig7")) == 25


def test_default_variants_share_the_main_training_and_test_time_variants_reuse_it():
    benchmark, paper = load_plan(PARAMS, "paper")
    main_key = main_run(paper, "visa").training_key
    runs = {run.name: run for run in experiment_runs(benchmark, paper, "table2")}
    assert runs["MoECLIP"].training_key == main_key
    assert runs["w/o FOFS"].training_key != main_key
    assert runs["w/o FOFS"].model.fofs is False and runs["w/o FOFS"].model.num_experts == 4
    noise = {run.name: run for run in experiment_runs(benchmark, paper, "table11")}
    assert noise["0.6"].training_key == main_key
    assert noise["0.6"].test_time["router_noise"] == 0.6
    medical = {run.name: run for run in experiment_runs(benchmark, paper, "table12")}
    assert medical["MoECLIP (Medical)"].training_key == main_run(paper, "brainmri").training_key


def test_vanilla_clip_is_untrained_and_reads_the_profiles_layers():
    benchmark, demo = load_plan(PARAMS)
    vanilla = experiment_runs(benchmark, demo, "table2")[0]
    assert vanilla.name == "Vanilla CLIP" and not vanilla.trained and vanilla.training_key is None
    assert vanilla.model.feature_layers == (1, 2, 3, 4) and vanilla.model.moe_layers == ()


def test_profile_variants_map_to_paper_rows():
    benchmark, demo = load_plan(PARAMS)
    layers = {run.name: run for run in experiment_runs(benchmark, demo, "table8")}
    assert layers["Layer 2"].paper_row == "Layer 12"
    assert layers["Layer 2"].model.feature_layers == (2,)
    assert layers["Ensemble"].paper_row == "Ensemble"


def test_loss_variants_override_moeclips_settings_and_keep_the_generic_training(tmp_path):
    benchmark, paper = load_plan(PARAMS, "paper")
    runs = {run.name: run for run in experiment_runs(benchmark, paper, "table2") + experiment_runs(benchmark, paper,
                                                                                                    "table10")}
    assert runs["w/o ETF Loss"].model.lambda_etf == 0.0 and runs["w/o ETF Loss"].train == paper.train
    assert (runs["w/o FOFS & ETF Loss"].model.fofs, runs["w/o FOFS & ETF Loss"].model.lambda_etf) == (False, 0.0)
    assert runs["Similarity Constraint"].model.expert_constraint == "cosine"
    assert runs["w/o ETF Loss"].training_key != main_run(paper, "visa").training_key
    as_training = _edited(tmp_path, lambda d: d["experiments"]["table2"]["variants"].update(
        {"w/o ETF Loss": {"train": {"lambda_etf": 0.0}}}))
    benchmark, paper = load_plan(as_training, "paper")
    with pytest.raises(ParamsError, match=r"variant 'w/o ETF Loss' train is invalid: lambda_etf: extra inputs are "
                                          r"not permitted$"):
        experiment_runs(benchmark, paper, "table2")


def _edited(tmp_path: Path, edit) -> Path:
    document = read_params(PARAMS)
    edit(document)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_invalid_variants_and_selections_are_named(tmp_path):
    bad_model = _edited(tmp_path, lambda d: d["experiments"]["table9"]["variants"].update({"0": {"model": {
        "paa_scales": [2]}}}))
    benchmark, paper = load_plan(bad_model, "paper")
    with pytest.raises(ParamsError, match=r"variant '0' model is invalid: value error, paa_scales must be positive odd integers, got \(2,\)$"):
        experiment_runs(benchmark, paper, "table9")
    unknown = _edited(tmp_path, lambda d: d["profiles"]["demo"]["experiments"].update({"table9": {"only": ["7"]}}))
    benchmark, demo = load_plan(unknown)
    with pytest.raises(ParamsError, match=r"unknown variants of 'table9': \['7'\]"):
        experiment_runs(benchmark, demo, "table9")
    with pytest.raises(ParamsError, match="no experiment 'table99'"):
        experiment_runs(benchmark, demo, "table99")
    no_auxiliary = _edited(tmp_path, lambda d: d["main"].update(auxiliary="btad"))
    with pytest.raises(ParamsError, match="main.auxiliary 'btad' has no entry"):
        load_plan(no_auxiliary)


def test_duplicate_keys_are_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: demo\nprofiles:\n  demo: {}\n  demo: {}\n")
    with pytest.raises(ParamsError, match="duplicate key 'demo'"):
        read_params(path)


def test_the_profile_to_run_must_exist(tmp_path):
    with pytest.raises(ParamsError, match=r"has no profile 'nope' \(it has: paper, release, paper-smoke, demo\)"):
        load_plan(PARAMS, "nope")
    unnamed = _edited(tmp_path, lambda d: d.pop("profile"))
    with pytest.raises(ParamsError, match=r"params file '.*params.yaml' is invalid: profile: field required$"):
        load_plan(unnamed)
    with pytest.raises(ParamsError, match="has no top-level `profile: <name>` entry"):
        load_profile(unnamed)
    with pytest.raises(ParamsError, match="does not exist"):
        load_plan(tmp_path / "missing.yaml")


def test_a_profile_without_its_model_and_training_is_named_in_one_line(tmp_path):
    bare = _edited(tmp_path, lambda d: d["profiles"].update(bare={"data": {"synthetic": True}}))
    with pytest.raises(ParamsError) as raised:
        load_profile(bare, "bare")
    assert str(raised.value) == f"profile 'bare' in '{bare}' is invalid: model: field required; train: field required"


def test_each_experiment_says_what_it_renders_and_a_wrong_value_is_one_line_naming_it(tmp_path):
    benchmark, _ = load_plan(PARAMS)
    assert {key: experiment.render for key, experiment in benchmark.experiments.items()} == \
        {key: "figure" if key in ("fig6", "fig7") else "table" for key in SPEC_EXPERIMENTS}
    chart = _edited(tmp_path, lambda d: d["experiments"]["table9"].update(render="chart"))
    with pytest.raises(ParamsError) as raised:
        load_plan(chart)
    assert str(raised.value) == \
        f"params file '{chart}' is invalid: experiments.table9.render: input should be 'table' or 'figure'"


def test_a_figures_variants_each_give_their_point_on_the_x_axis(tmp_path):
    benchmark, paper = load_plan(PARAMS, "paper")
    assert benchmark.experiments["fig7"].variants["lambda_etf=0.001"].x == {"lambda_etf": 0.001}
    unplaced = _edited(tmp_path, lambda d: d["experiments"]["fig6"]["variants"].update({"K=9": {"model": {
        "num_experts": 9}}}))
    with pytest.raises(ParamsError, match=r"experiments\.fig6: value error, variant 'K=9' needs `x: \{parameter: "
                                          r"value\}` \(a figure's point\)$"):
        load_plan(unplaced)
    placed_in_a_table = _edited(tmp_path, lambda d: d["experiments"]["table9"]["variants"]["1"].update(x={"s": 1}))
    with pytest.raises(ParamsError, match=r"experiments\.table9: value error, variant '1' of a table has an `x`$"):
        load_plan(placed_in_a_table)
    two = _edited(tmp_path, lambda d: d["experiments"]["fig6"]["variants"]["K=4"].update(x={"K": 4, "r": 8}))
    with pytest.raises(ParamsError, match=r"experiments\.fig6\.variants\.K=4\.x: value error, x names one parameter"):
        load_plan(two)
    own = _edited(tmp_path, lambda d: d["profiles"]["demo"]["experiments"].update({"fig6": {"variants": {
        "K=2": {"model": {"num_experts": 2}}}}}))
    benchmark, demo = load_plan(own)
    with pytest.raises(ParamsError, match=r"profile 'demo' variants of 'fig6' are invalid:\nvariant 'K=2' needs `x"):
        experiment_runs(benchmark, demo, "fig6")
