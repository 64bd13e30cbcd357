"""params.yaml's `methods`: each baseline resolved for every profile, Table 1's protocol, and the counts the
baselines' papers and code state."""
from pathlib import Path

import pytest
import yaml

from moeclip.bench.baselines import method_runs
from moeclip.bench.experiments import load_plan
from moeclip.bench.params import ParamsError
from moeclip.methods.registry import METHODS, method_of

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("paper", "release", "paper-smoke", "demo")


@pytest.mark.parametrize("profile_name", PROFILES)
def test_every_profile_runs_every_baseline_on_table1s_protocol(profile_name):
    benchmark, profile = load_plan(ROOT / "params.yaml", profile_name)
    assert set(benchmark.methods) == {"winclip", "april_gan", "anomalyclip", "wmoe_clip", "adaclip", "aa_clip",
                                      "bayes_pfl"} <= set(METHODS)
    assert benchmark.table1_trainings == {"visa": benchmark.main.targets["visa"], "mvtec": ("visa",)}
    for method in benchmark.methods:
        runs = method_runs(benchmark, profile, method)
        assert [(run.name, run.train_on) for run in runs] == [("visa", ("visa",)), ("mvtec", ("mvtec",))]
        assert all(run.trained == (method != "winclip") for run in runs)
        assert all(method_of(run.model).name == method for run in runs)
    assert benchmark.methods["wmoe_clip"].label == "WMoE-CLIP (approximation)"


def test_the_paper_profile_runs_the_baselines_as_their_authors_did():
    benchmark, paper = load_plan(ROOT / "params.yaml", "paper")
    winclip, april_gan, anomalyclip = (method_runs(benchmark, paper, m) for m in ("winclip", "april_gan",
                                                                                     "anomalyclip"))
    assert (winclip[0].model.backbone, winclip[0].model.image_size, winclip[0].model.weights) == \
        ("ViT-B-16-plus-240", 240, "laion400m_e31")
    assert [run.train.epochs for run in april_gan] == [15, 3]  # 15 epochs on VisA, 3 on MVTec
    assert {(run.train.lr, run.train.batch_size, run.train.seed) for run in april_gan + anomalyclip} == \
        {(0.001, 8, 111)}
    assert april_gan[0].model.feature_layers == (6, 12, 18, 24) and not april_gan[0].model.quick_gelu
    assert anomalyclip[0].model.feature_layers == (24,) and anomalyclip[0].model.dpam_from == 6
    bayes_pfl = method_runs(benchmark, paper, "bayes_pfl")  # train.sh and test.sh
    assert {(run.train.lr, run.train.batch_size, run.train.seed, run.train.epochs, run.train.augment)
            for run in bayes_pfl} == {(0.0001, 32, 333, 30, True)}
    model = bayes_pfl[0].model
    assert (model.backbone, model.image_size, model.feature_layers, model.quick_gelu) == \
        ("ViT-L-14-336", 518, (6, 12, 18, 24), False)
    assert (model.prompt_num, model.context_length, model.state_length, model.num_flows, model.test_samples,
            model.sample_seed, model.sigma, model.score_alpha) == (3, 5, 5, 10, 10, 333, 8.0, 0.5)
    adaclip = method_runs(benchmark, paper, "adaclip")  # the official train.py defaults, seed of setup_seed
    assert {(run.train.epochs, run.train.lr, run.train.batch_size, run.train.seed) for run in adaclip} == \
        {(5, 0.01, 1, 111)}
    model = adaclip[0].model
    assert (model.feature_layers, model.prompting_length, model.prompting_depth, model.k_clusters, model.quick_gelu) \
        == ((6, 12, 18, 24), 5, 4, 20, False)


@pytest.mark.parametrize(("method", "trainable"), [("winclip", 0), ("april_gan", 3_148_800),
                                                    ("anomalyclip", 43_008), ("adaclip", 10_665_472),
                                                    ("aa_clip", 12_582_912), ("bayes_pfl", 20_414_752)])
def test_trainable_parameters_at_paper_size_are_the_published_counts(method, trainable):
    benchmark, paper = load_plan(ROOT / "params.yaml", "paper")
    model = method_runs(benchmark, paper, method)[0].model
    assert method_of(model).count_parameters(model)["trainable"] == trainable


def _edited(tmp_path: Path, edit) -> Path:
    document = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(document)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_a_wrong_methods_entry_is_named_in_one_line(tmp_path):
    benchmark, demo = load_plan(ROOT / "params.yaml", "demo")
    with pytest.raises(ParamsError, match="no method 'nope' in params.yaml `methods`"):
        method_runs(benchmark, demo, "nope")

    def bad_field(document):
        document["profiles"]["demo"]["methods"]["april_gan"]["model"]["feature_layers"] = "six"
    with pytest.raises(ParamsError, match=r"profiles\.demo\.methods\.april_gan\.model is invalid: feature_layers"):
        method_runs(*load_plan(_edited(tmp_path, bad_field), "demo"), "april_gan")

    def no_settings(document):
        del document["profiles"]["demo"]["methods"]["winclip"]
    with pytest.raises(ParamsError, match="profile 'demo' has no `methods.winclip` settings"):
        method_runs(*load_plan(_edited(tmp_path, no_settings), "demo"), "winclip")

    def untrained(document):
        document["profiles"]["demo"]["methods"]["april_gan"]["train"] = None
    with pytest.raises(ParamsError, match=r"methods\.april_gan\.train: april_gan is trained, so it needs a train"):
        method_runs(*load_plan(_edited(tmp_path, untrained), "demo"), "april_gan")

    def trained_winclip(document):
        document["profiles"]["demo"]["methods"]["winclip"]["train"] = document["profiles"]["demo"]["train"]
    with pytest.raises(ParamsError, match="winclip is training-free, so it needs train: null"):
        method_runs(*load_plan(_edited(tmp_path, trained_winclip), "demo"), "winclip")

    def unknown_method(document):
        document["methods"]["mystery"] = {"label": "Mystery", "published": "WinCLIP"}
        document["profiles"]["demo"]["methods"]["mystery"] = {"model": {}, "train": None}
    with pytest.raises(ParamsError, match="`methods.mystery`: no method 'mystery'"):
        method_runs(*load_plan(_edited(tmp_path, unknown_method), "demo"), "mystery")


@pytest.mark.parametrize("method", ["moeclip", "winclip", "april_gan", "anomalyclip", "wmoe_clip", "adaclip",
                                    "aa_clip", "bayes_pfl"])
def test_every_method_refuses_a_sequence_first_backbone(method):
    """open_clip < 2.26.1 ran its blocks sequence-first; token indexing written for batch-first would then mix
    images silently (BASELINES.md pitfall 2), so every method refuses such a backbone before any work."""
    benchmark, demo = load_plan(ROOT / "params.yaml", "demo")
    config = demo.model if method == "moeclip" else method_runs(benchmark, demo, method)[0].model
    method_class = METHODS[method]
    clip = method_class.load_backbone(config)
    clip.visual.transformer.batch_first = False
    with pytest.raises(ValueError, match="must be batch-first"):
        method_class(config, clip, None)
