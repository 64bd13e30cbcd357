"""`moeclip report`: tables put ours beside the paper's with the difference and the best marked."""
import json
from pathlib import Path

import pandas as pd
import pytest

from moeclip.errors import MoeclipError
from moeclip.bench.experiments import experiment_runs, load_plan
from moeclip.bench.reports.render import (experiment_figures, experiment_tables, figure_files, render_reports,
                                          similarity_figure, sweep_markdown, utilisation_figure)
from moeclip.bench.reports.tables import (Comparison, MethodColumn, MethodTable, best_index, fmt_delta,
                                          method_markdown, variant_latex, variant_markdown)
from test_experiments import _edited

ROOT = Path(__file__).resolve().parents[1]


def _comparison() -> Comparison:
    cells = [("mvtec", "pixel_auroc"), ("cost", "inference_ms")]
    ours = {"A": {cells[0]: 90.0, cells[1]: 10.0}, "B": {cells[0]: 92.5, cells[1]: 12.0}}
    paper = {"A": {cells[0]: 91.0, cells[1]: 20.0}, "B": {cells[0]: 90.0, cells[1]: None}}
    return Comparison("t", "Test table", ["A", "B"], cells, ours, paper, {"B": "Paper B"}, {"mvtec": "MVTec-AD"})


def test_markdown_cells_hold_ours_paper_and_difference_with_best_in_bold():
    lines = variant_markdown(_comparison()).splitlines()
    assert lines[2].startswith("| variant | MVTec-AD P-AUROC ours | MVTec-AD P-AUROC paper | MVTec-AD P-AUROC Δ")
    # Higher AUROC is better, lower latency is better; a missing paper value shows '-'.
    assert lines[4] == "| A | 90.0 | **91.0** | -1.0 | **10.0** | **20.0** | -10.0 |"
    assert lines[5] == "| B (paper: Paper B) | **92.5** | 90.0 | +2.5 | 12.0 | - | - |"


def test_latex_has_grouped_headers_escaped_labels_and_bold():
    latex = variant_latex(_comparison())
    assert r"\multicolumn{3}{c}{MVTec-AD P-AUROC}" in latex
    assert r"A & 90.0 & \textbf{91.0} & -1.0 & \textbf{10.0} & \textbf{20.0} & -10.0 \\" in latex
    assert latex.count(r"\begin{tabular}") == latex.count(r"\end{tabular}") == 1


def test_best_and_difference_helpers():
    assert best_index([1.0, None, 3.0, 3.0], "pixel_auroc") == {2, 3}
    assert best_index([5.0, 2.0], "params_m") == {1}
    assert best_index([None, float("nan")], "image_ap") == set()
    assert fmt_delta(93.96, 93.9) == "+0.1" and fmt_delta(None, 1.0) == "-"


def test_synthetic_numbers_never_count_as_the_best_method():
    def row(ours_competes: bool) -> str:
        cell = ("mvtec", "pixel_auroc")
        columns = [MethodColumn("X", {cell: 80.0}), MethodColumn("X (ours, demo)", {cell: 95.0}, ours=True),
                   MethodColumn("MoECLIP (paper)", {cell: 90.0}), MethodColumn("MoECLIP (ours, demo)", {cell: 99.0}, True)]
        table = MethodTable("T", ["pixel_auroc"], {"pixel_auroc": ["mvtec"]}, columns, ours_competes=ours_competes)
        return method_markdown(table).splitlines()[-1]

    assert row(True) == "| mvtec | 80.0 | 95.0 | 90.0 | **99.0** | +9.0 |"
    assert row(False) == "| mvtec | 80.0 | 95.0 | **90.0** | 99.0 | +9.0 |"  # no run of ours counts


def _fake_pipeline_outputs(params: Path) -> tuple:
    """Metric files as the stages write them, with our value = 50 + row index everywhere."""
    benchmark, profile = load_plan(params)
    for auxiliary, targets in benchmark.main.targets.items():
        for target in targets:
            path = profile.layout.evaluation_metrics(auxiliary, target)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"image_auroc": 80.0, "image_ap": 81.0, "pixel_auroc": 90.0, "pixel_ap": 30.0}))
    for name, spec in benchmark.experiments.items():
        metrics = {}
        for index, run in enumerate(experiment_runs(benchmark, profile, name)):
            metrics[run.name] = {d: {"image_auroc": 50.0 + index, "pixel_auroc": 60.0 + index} for d in spec.datasets}
            if spec.cost:
                metrics[run.name]["cost"] = {"params_m": 1.0, "inference_ms": 2.0, "peak_memory_mb": None,
                                             "flops_g": 0.1}
        path = profile.layout.experiment_metrics(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics))
        resources = {run.name: {"params_m": 3.5 + index, "trainable_m": 0.02, "seconds": None, "peak_rss_gib": None}
                     for index, run in enumerate(experiment_runs(benchmark, profile, name))}
        if name == "table13":  # as a profile that measures time writes it
            resources = {run: {**record, "seconds": 61.25, "peak_rss_gib": 9.5} for run, record in resources.items()}
        profile.layout.experiment_resources(name).parent.mkdir(parents=True, exist_ok=True)
        profile.layout.experiment_resources(name).write_text(json.dumps(resources))
    for index, method in enumerate(benchmark.methods):  # baseline i: 60 + i everywhere, trained on each auxiliary
        metrics = {auxiliary: {target: {"image_auroc": 60.0 + index, "pixel_auroc": 60.0 + index} for target in targets}
                   for auxiliary, targets in benchmark.table1_trainings.items()}
        profile.layout.baseline_metrics(method).parent.mkdir(parents=True, exist_ok=True)
        profile.layout.baseline_metrics(method).write_text(json.dumps(metrics))
        profile.layout.baseline_resources(method).parent.mkdir(parents=True, exist_ok=True)
        profile.layout.baseline_resources(method).write_text(json.dumps({"params_m": 1.5, "trainable_m": 0.043}))
    folder = profile.layout.analysis()
    folder.mkdir(parents=True)
    pd.DataFrame({"expert": [1, 2, 3, 4], "n_patches": [5, 6, 7, 8], "gradient": [1.0, 2, 3, 4],
                  "contrast": [1.0, 2, 3, 4], "entropy": [0.5, 1, 1.5, 2]}).to_csv(folder / "routed_statistics.csv")
    pd.DataFrame({"dataset": ["mvtec"] * 4, "layer": 3, "expert": [1, 2, 3, 4], "share": [25.0] * 4}).to_csv(
        folder / "utilisation.csv", index=False)
    (folder / "similarity.json").write_text(json.dumps({"layer": 3, "dataset": "mvtec", "matrix": [
        [1.0, 0.1, None, 0.2], [0.1, 1.0, 0.3, 0.0], [None, 0.3, 1.0, 0.1], [0.2, 0.0, 0.1, 1.0]]}))
    return benchmark, profile


def test_report_renders_every_table_with_all_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    benchmark, profile = _fake_pipeline_outputs(ROOT / "params.yaml")
    out = render_reports(benchmark, profile)
    assert out == Path("reports/demo")
    assert experiment_tables(benchmark) == ["table2", "table5", "table6", "table7", "table8", "table9", "table10",
                                            "table11", "table12", "table13"]  # params.yaml's, in its order
    for key in ("table1", *experiment_tables(benchmark), "table14"):
        assert (out / f"{key}.md").is_file() and (out / f"{key}.tex").is_file()
    for figure in ("fig5_expert_similarity", "fig6_number_of_experts_k", "fig7_hyperparameter_sweeps", "fig9_expert_utilisation"):
        assert (out / f"{figure}.png").stat().st_size > 1000
    table1 = (out / "table1.md").read_text()
    # Every dataset of the paper's Table 1 is a row; MoECLIP (paper) mvtec image AUROC 93.9 vs ours 80.0.
    for name in ("MVTec-AD", "VisA", "BTAD", "RSDD", "DTD-Synthetic", "Brain MRI", "Head CT", "Liver CT",
                 "Retina OCT", "ColonDB", "ClinicDB", "CVC-300", "Endo", "Kvasir"):
        assert f"| {name} |" in table1
    assert "| MVTec-AD | 91.8 | 86.1 |" not in table1  # each run baseline stands beside its published numbers:
    assert ("| dataset | WinCLIP | WinCLIP (ours, demo) | April-GAN | April-GAN (ours, demo) | AnomalyCLIP | "
            "AnomalyCLIP (ours, demo) | AdaCLIP | AdaCLIP (ours, demo) | AA-CLIP | AA-CLIP (ours, demo) | Bayes-PFL | "
            "Bayes-PFL (ours, demo) | WMoE-CLIP (published) | WMoE-CLIP (approximation) (ours, demo) | "
            "MoECLIP (paper) | MoECLIP (ours, demo) | Δ |") in table1  # every published column has our run
    assert ("| MVTec-AD | 91.8 | 60.0 | 86.1 | 61.0 | 91.9 | 62.0 | 91.5 | 64.0 | 90.9 | 65.0 | 92.2 | 66.0 | - | 63.0 "
            "| **93.9** | 80.0 |") in table1  # WMoE-CLIP's MVTec image AUROC is not public; its VisA one (87.3) is
    assert ("| VisA | 78.1 | 60.0 | 77.5 | 61.0 | 82.1 | 62.0 | 83.0 | 64.0 | 79.2 | 65.0 | 86.8 | 66.0 | **87.3** "
            "| 63.0 |") in table1
    assert "| **93.9** | 80.0 | -13.9 |" in table1
    for label in ("WMoE-CLIP (approximation)", "AdaCLIP", "AA-CLIP", "Bayes-PFL"):  # the baselines' parameter counts
        assert f"| {label} | 1.50 | 0.0430 |" in table1
    assert "| Average (pixel) | 14.7 |" in table1
    table2 = (out / "table2.md").read_text()
    for row in experiment_runs(benchmark, profile, "table2"):
        assert f"| {row.name} |" in table2
    # The demo's "Layer 2" row is compared with the paper's "Layer 12" row (MVTec-AD image AUROC 90.0).
    assert "| Layer 2 (paper: Layer 12) | 50.0 | 90.0 | -40.0 |" in (out / "table8.md").read_text()
    readme = (out / "README.md").read_text()
    assert "not** paper results" in readme and "![fig6_number_of_experts_k.png](fig6_number_of_experts_k.png)" in readme
    # Beside each experiment, its variants' sizes; time and memory only where they were measured.
    table5 = (out / "table5.md").read_text()
    assert "| Variant   |   Params (M) |   Trainable (M) |" in table5 and "| Tiny@80   |        4.500 |           0.020 |" in table5
    assert "Wall time" not in table5
    assert "|   Wall time (s) |   Peak RSS (GiB) |" in (out / "table13.md").read_text()
    assert readme.count(": size and cost") == len(benchmark.experiments)


def test_an_experiment_the_paper_has_no_numbers_for_is_a_table_of_ours_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _edited(tmp_path, lambda d: d["experiments"].update(my_sweep={
        "title": "FOFS on two sets", "render": "table", "datasets": ["mvtec", "headct"],
        "variants": {"MoECLIP": {}, "w/o FOFS": {"model": {"fofs": False}}}}))
    benchmark, profile = _fake_pipeline_outputs(params)
    out = render_reports(benchmark, profile)
    assert experiment_tables(benchmark)[-1] == "my_sweep" and "my_sweep" not in experiment_figures(benchmark)
    assert (out / "my_sweep.md").read_text().splitlines()[:6] == [
        "### my_sweep: FOFS on two sets", "",
        "| variant | MVTec-AD I-AUROC ours | MVTec-AD P-AUROC ours | Head CT I-AUROC ours | Head CT P-AUROC ours |",
        "|---|---:|---:|---:|---:|",
        "| MoECLIP | 50.0 | 60.0 | 50.0 | 60.0 |",
        "| w/o FOFS | **51.0** | **61.0** | **51.0** | **61.0** |"]
    latex = (out / "my_sweep.tex").read_text()
    assert r"variant & \multicolumn{1}{c}{MVTec-AD I-AUROC} &" in latex and "paper" not in latex
    assert r"w/o FOFS & \textbf{51.0} & \textbf{61.0} & \textbf{51.0} & \textbf{61.0} \\" in latex


def test_a_figure_experiment_is_a_figure_whatever_its_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _edited(tmp_path, lambda d: d["experiments"].update(noise_sweep={
        "title": "Router noise", "render": "figure", "datasets": ["mvtec"],
        "variants": {"strong": {"model": {"router_noise": 0.5}, "x": {"alpha": 0.5}}, "none": {"x": {"alpha": 0}}}}))
    benchmark, profile = _fake_pipeline_outputs(params)
    out = render_reports(benchmark, profile)
    assert experiment_figures(benchmark) == ["fig6", "fig7", "noise_sweep"]
    assert "noise_sweep_router_noise.png" in figure_files(benchmark)  # dvc.yaml's plots list it too
    assert (out / "noise_sweep_router_noise.png").stat().st_size > 1000 and not (out / "noise_sweep.md").exists()
    numbers = (out / "README.md").read_text().split("### Numbers behind noise_sweep\n\n")[1].splitlines()[:4]
    assert [[cell.strip() for cell in line.split("|")[1:5]] for line in numbers[2:]] == \
        [["alpha", "0.5", "50.0", "60.0"], ["alpha", "0", "51.0", "61.0"]]  # each value as its `x` writes it


def test_report_without_pipeline_outputs_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    benchmark, profile = load_plan(ROOT / "params.yaml")
    with pytest.raises(MoeclipError, match=r"metrics/evaluate/visa/mvtec.json' is missing: run the pipeline"):
        render_reports(benchmark, profile)


def test_a_smoke_profiles_report_says_it_is_a_smoke_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    benchmark, _ = _fake_pipeline_outputs(ROOT / "params.yaml")
    _, smoke = load_plan(ROOT / "params.yaml", "paper-smoke")
    readme = (render_reports(benchmark, smoke.model_copy(update={"runs": Path("runs"), "name": "demo"}))
              / "README.md").read_text()
    assert "a **smoke run**: ViT-L-14-336 at 518 px with random weights, at most 1 optimiser step(s)" in readme
    assert "never to be compared with the paper's" in readme


def _drawn_extents(figure):
    """Lay the figure out as saving does; its renderer measures the artists."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def test_the_similarity_figures_title_fits_inside_the_figure():
    figure = similarity_figure([[1.0, 0.2, 0.1, 0.0]] * 4, 18, "brainmri")
    renderer = _drawn_extents(figure)
    title = figure.axes[0].title.get_window_extent(renderer)
    assert 0 <= title.x0 and title.x1 <= figure.bbox.x1 and title.y1 <= figure.bbox.y1


def test_the_utilisation_legend_covers_no_bar():
    frame = pd.DataFrame({"dataset": [d for d in ("mvtec", "btad", "kvasir") for _ in range(4)],
                          "expert": [1, 2, 3, 4] * 3, "share": [40.0, 10, 10, 40] * 3})
    figure = utilisation_figure(frame)
    renderer = _drawn_extents(figure)
    legend = figure.legends[0].get_window_extent(renderer)
    bars = [patch.get_window_extent(renderer) for patch in figure.axes[0].patches]
    assert len(bars) == 12 and not any(legend.overlaps(bar) for bar in bars)
    assert legend.x1 <= figure.bbox.x1


def test_sweep_numbers_keep_the_values_as_named():
    frame = pd.DataFrame({"parameter": ["lambda_etf"] * 3, "value": ["0", "0.001", "0.01"],
                          "image_auroc": [80.04, 81.26, None]})
    lines = sweep_markdown(frame).splitlines()
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["0", "0.001", "0.01"]
    assert [line.split("|")[3].strip() for line in lines[2:]] == ["80.0", "81.3", "-"]
