import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import stats

from nnunetv2_proto.cli import main
from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.evaluation.compare import compare
from nnunetv2_proto.evaluation.paired_stats import paired_tests
from nnunetv2_proto.evaluation.evaluate import evaluate_folders
from nnunetv2_proto.evaluation.metrics import image_diagonal_mm, structure_metrics


def ball(shape, centre, radius, spacing=(1, 1, 1)):
    grid = np.indices(shape).astype(float)
    distance = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)))
    return distance <= radius


def test_identical_masks_are_perfect():
    mask = ball((20, 20, 20), (10, 10, 10), 5)
    m = structure_metrics(mask, mask, (1, 1, 1))
    assert (m.Dice, m.IoU, m.HD95, m.ASD) == (1.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize("offset,spacing", [((0, 0, 3), (1, 1, 1)), ((2, 0, 0), (3.0, 0.5, 0.5)),
                                            ((1, 2, 0), (2.0, 1.5, 1.0))])
def test_surface_distance_of_single_voxels_is_the_physical_offset(offset, spacing):
    reference = np.zeros((10, 10, 10), bool)
    prediction = np.zeros_like(reference)
    reference[4, 4, 4] = True
    prediction[4 + offset[0], 4 + offset[1], 4 + offset[2]] = True
    physical = float(np.sqrt(sum((o * s) ** 2 for o, s in zip(offset, spacing))))
    m = structure_metrics(reference, prediction, spacing)
    assert m.Dice == 0.0 and m.HD95 == pytest.approx(physical) and m.ASD == pytest.approx(physical)


def test_concentric_spheres_are_their_radius_difference_apart_in_mm():
    spacing = (2.0, 1.0, 1.0)  # anisotropic: radii are physical, so the balls are ellipsoids in voxels
    small = ball((40, 60, 60), (20, 30, 30), 8, spacing)
    large = ball((40, 60, 60), (20, 30, 30), 14, spacing)
    m = structure_metrics(small, large, spacing)
    assert m.HD95 == pytest.approx(6.0, abs=1.5)
    assert m.ASD == pytest.approx(6.0, abs=1.5)
    assert m.Dice == pytest.approx(2 * small.sum() / (small.sum() + large.sum()))


def test_overlap_of_boxes_is_exact():
    reference = np.zeros((10, 10), bool)
    prediction = np.zeros_like(reference)
    reference[0:4, 0:5] = True    # 20 pixels
    prediction[2:6, 0:5] = True   # 20 pixels, 10 shared
    m = structure_metrics(reference, prediction, (1.0, 1.0))
    assert m.Dice == pytest.approx(0.5) and m.IoU == pytest.approx(10 / 30)


def test_empty_mask_conventions_never_give_nan():
    empty = np.zeros((8, 8, 8), bool)
    full = ball((8, 8, 8), (4, 4, 4), 2)
    both = structure_metrics(empty, empty, (1, 1, 1))
    assert (both.Dice, both.IoU, both.HD95, both.ASD) == (1.0, 1.0, 0.0, 0.0)
    worst = image_diagonal_mm((8, 8, 8), (1, 2, 3))
    for reference, prediction in ((empty, full), (full, empty)):
        m = structure_metrics(reference, prediction, (1, 2, 3))
        assert (m.Dice, m.IoU, m.HD95, m.ASD) == (0.0, 0.0, worst, worst)


def write(array, path, spacing_zyx):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    sitk.WriteImage(image, str(path))


DATASET_JSON = {"labels": {"background": 0, "left": 1, "right": 2}, "file_ending": ".nii.gz",
                "channel_names": {"0": "CT"}, "numTraining": 4}


def test_evaluate_folders_reads_spacing_from_headers(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    reference = np.zeros((10, 12, 12), np.uint8)
    reference[4, 6, 3] = 1
    reference[2:6, 2:5, 7:10] = 2
    prediction = reference.copy()
    prediction[4, 6, 3] = 0
    prediction[5, 6, 3] = 1  # shifted one slice: 3 mm
    write(reference, gt / "case_a.nii.gz", (3.0, 0.8, 0.8))
    write(prediction, pred / "case_a.nii.gz", (3.0, 0.8, 0.8))
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    result = evaluate_folders(gt, pred, tmp_path / "dataset.json", tmp_path / "out.json", num_processes=1)
    left = result["metric_per_case"][0]["metrics"]["left"]
    assert left["HD95"] == pytest.approx(3.0) and left["Dice"] == 0.0
    assert result["mean"]["right"]["Dice"] == 1.0 and result["mean"]["right"]["HD95"] == 0.0
    assert json.loads((tmp_path / "out.json").read_text())["structures"] == {"left": [1], "right": [2]}


def test_evaluate_cli_smoke(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    reference = np.zeros((6, 8, 8), np.uint8)
    reference[2:4, 2:6, 2:6] = 1
    write(reference, gt / "x.nii.gz", (1, 1, 1))
    write(reference, pred / "x.nii.gz", (1, 1, 1))
    assert main(["evaluate", "--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "r.json"), "-np", "1"]) == 0
    assert "Dice 1.000" in capsys.readouterr().out
    assert main(["evaluate", "--gt", str(gt), "--pred", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2


def make_results_tree(root: Path, dice_drop: dict) -> dict:
    """Baseline predictions are perfect; 'worse' removes voxels so per-case Dice of 'left' is known."""
    dataset = "Dataset777_Cmp"
    gt_folder = root / "nnUNet_preprocessed" / dataset / "gt_segmentations"
    gt_folder.mkdir(parents=True)
    (root / "nnUNet_preprocessed" / dataset / "dataset.json").write_text(json.dumps(DATASET_JSON))
    expected = {}
    for i, removed in enumerate(dice_drop["removed"]):
        case = f"c{i}"
        seg = np.zeros((8, 10, 10), np.uint8)
        seg[1:5, 1:6, 1:6] = 1   # 100 voxels
        seg[5:7, 6:9, 6:9] = 2
        write(seg, gt_folder / f"{case}.nii.gz", (2.0, 1.0, 1.0))
        worse = seg.copy()
        worse[1:5, 1:6, 1:6].flat[:removed] = 0
        expected[case] = 2 * (100 - removed) / (200 - removed)
        for trainer, prediction in (("nnUNetTrainer", seg), ("worseTrainer", worse)):
            folder = root / "nnUNet_results" / dataset / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0" / "validation"
            folder.mkdir(parents=True, exist_ok=True)
            write(prediction, folder / f"{case}.nii.gz", (2.0, 1.0, 1.0))
            (folder / "summary.json").write_text("{}")
    return {"dataset": dataset, "expected_left_dice": expected}


def test_compare_reports_known_scores_and_paired_p_values(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    tree = make_results_tree(tmp_path, {"removed": [0, 10, 20, 30, 45, 60]})
    out = compare(tree["dataset"], "3d_fullres", ["nnUNetTrainer", "worseTrainer"], folds=[0],
                  output=tmp_path / "cmp", num_processes=1, progress=lambda _: None)
    report = json.loads((out / "comparison.json").read_text())
    row = next(r for r in report["statistics"] if r["trainer"] == "worseTrainer" and r["structure"] == "left"
               and r["metric"] == "Dice")
    worse = np.array(list(tree["expected_left_dice"].values()))
    assert row["mean"] == pytest.approx(worse.mean()) and row["std"] == pytest.approx(worse.std())
    assert row["diff_vs_baseline"] == pytest.approx((worse - 1).mean())
    assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon(worse, np.ones_like(worse)).pvalue)
    assert row["p_ttest"] == pytest.approx(stats.ttest_rel(worse, np.ones_like(worse)).pvalue)
    markdown = (out / "comparison.md").read_text()
    assert "`worseTrainer`" in markdown and "Baseline: `nnUNetTrainer`" in markdown
    assert (out / "comparison_boxplots.png").is_file() and (out / "comparison_scatter.png").is_file()
    assert (out / "comparison.csv").read_text().count("\n") == len(report["statistics"]) + 1


def test_compare_names_missing_trainers_and_folds(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    tree = make_results_tree(tmp_path, {"removed": [0, 10, 20]})
    with pytest.raises(SetupError) as error:
        compare(tree["dataset"], "3d_fullres", ["nnUNetTrainer", "ghostTrainer"], folds=[0, 1], num_processes=1,
                progress=lambda _: None)
    assert "ghostTrainer: no results folder" in str(error.value) and "fold 1" in str(error.value)
    out = compare(tree["dataset"], "3d_fullres", ["nnUNetTrainer", "worseTrainer", "ghostTrainer"], folds=[0, 1],
                  output=tmp_path / "cmp", allow_missing=True, num_processes=1, progress=lambda _: None)
    assert "ghostTrainer: no results folder" in (out / "comparison.md").read_text()


def test_paired_tests_handle_identical_and_tiny_samples():
    assert paired_tests(np.ones(5), np.ones(5)) == (1.0, 1.0)
    assert all(np.isnan(p) for p in paired_tests(np.ones(1), np.zeros(1)))


def left_removed_run(root: Path, dataset: str, folder_trainer: str, removed: int, cases: int = 4) -> None:
    """A fold-0 run whose every case misses ``removed`` of the 100 voxels of 'left' (references as above)."""
    folder = root / "nnUNet_results" / dataset / f"{folder_trainer}__nnUNetPlans__3d_fullres" / "fold_0" / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        seg = np.zeros((8, 10, 10), np.uint8)
        seg[1:5, 1:6, 1:6] = 1
        seg[5:7, 6:9, 6:9] = 2
        seg[1:5, 1:6, 1:6].flat[:removed] = 0
        write(seg, folder / f"c{i}.nii.gz", (2.0, 1.0, 1.0))
    (folder / "summary.json").write_text("{}")


def test_compare_treats_seeded_runs_as_the_unit_of_evidence(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    tree = make_results_tree(tmp_path, {"removed": [0, 0, 0, 0]})
    removed = {"nnUNetTrainer": [0, 10, 20], "worseTrainer": [30, 40, 50], "noisyTrainer": [20, 0, 10]}
    for trainer, per_seed in removed.items():
        for seed, r in zip((1, 2, 3), per_seed):
            left_removed_run(tmp_path, tree["dataset"], f"{trainer}_seed{seed}", r)

    def run_mean(r):  # per-case mean over structures: 'right' is perfect
        return (2 * (100 - r) / (200 - r) + 1) / 2
    out = compare(tree["dataset"], "3d_fullres", list(removed), folds=[0], seeds=[1, 2, 3], output=tmp_path / "cmp",
                  num_processes=1, progress=lambda _: None)
    report = json.loads((out / "comparison.json").read_text())
    assert report["runs"] == ["fold 0 seed 1", "fold 0 seed 2", "fold 0 seed 3"]
    rows = {r["trainer"]: r for r in report["run_statistics"] if r["structure"] == "mean of structures"}
    base = np.array([run_mean(r) for r in removed["nnUNetTrainer"]])
    worse = np.array([run_mean(r) for r in removed["worseTrainer"]])
    assert rows["nnUNetTrainer"]["between_run_sd"] == pytest.approx(base.std(ddof=1))
    assert rows["worseTrainer"]["diff_vs_baseline"] == pytest.approx((worse - base).mean())
    assert rows["worseTrainer"]["p_ttest_runs"] == pytest.approx(stats.ttest_rel(worse, base).pvalue)
    assert rows["worseTrainer"]["runs_better"] == 0 and rows["worseTrainer"]["verdict"] == "worse"
    assert rows["noisyTrainer"]["verdict"] == "within run-to-run spread"
    assert rows["noisyTrainer"]["ci95_low"] < 0 < rows["noisyTrainer"]["ci95_high"]
    markdown = (out / "comparison.md").read_text()
    assert "within run-to-run spread" in markdown and "Runs per trainer: 3" in markdown
    assert (out / "comparison_runs.png").is_file() and (out / "comparison_runs.csv").is_file()
    # one seed per trainer: said plainly, no verdict
    out = compare(tree["dataset"], "3d_fullres", list(removed), folds=[0], seeds=[2], output=tmp_path / "one",
                  num_processes=1, progress=lambda _: None)
    assert "cannot be told from run-to-run noise" in (out / "comparison.md").read_text()


def test_a_run_known_only_from_an_earlier_comparison_counts_as_that_run(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    tree = make_results_tree(tmp_path, {"removed": [0, 0, 0, 0]})
    removed = {"nnUNetTrainer": [0, 10, 20], "worseTrainer": [30, 40, 55]}
    for trainer, per_seed in removed.items():
        for seed, r in zip((1, 2, 3), per_seed):
            left_removed_run(tmp_path, tree["dataset"], f"{trainer}_seed{seed}", r)
    trainers = list(removed)

    def compared(name, **kwargs):
        out = compare(tree["dataset"], "3d_fullres", kwargs.pop("trainers", trainers), folds=[0],
                      output=tmp_path / name, num_processes=1, progress=lambda _: None, **kwargs)
        return json.loads((out / "comparison.json").read_text()), (out / "comparison.md").read_text()
    everything, _ = compared("all", seeds=[1, 2, 3])
    seed1_alone, _ = compared("seed1", seeds=[1], trainers=["nnUNetTrainer"])
    earlier = tmp_path / "seed1" / "comparison.json"
    # the baseline's seed 1 predictions are lost with a machine; its stored per-case scores stand in for them
    shutil.rmtree(tmp_path / "nnUNet_results" / tree["dataset"] / "nnUNetTrainer_seed1__nnUNetPlans__3d_fullres")
    with pytest.raises(SetupError, match="nnUNetTrainer_seed1: no results folder"):
        compared("lost", seeds=[1, 2, 3])
    stood_in, markdown = compared("stood_in", seeds=[1, 2, 3], earlier=[earlier])
    for key in ("runs", "run_statistics", "statistics", "per_case"):
        assert stood_in[key] == everything[key], key
    assert stood_in["earlier_runs"] == [{"trainer": "nnUNetTrainer", "run": "fold 0 seed 1", "comparison": str(earlier)}]
    assert f"`nnUNetTrainer` fold 0 seed 1: {earlier}" in markdown
    # what cannot stand in for a run is refused with the reason
    with pytest.raises(SetupError, match="not among the requested"):
        compared("other_seeds", seeds=[2, 3], earlier=[earlier])
    # a comparison of several seeds stores each run's scores: any of its runs can stand in, here all six
    from_pooled, _ = compared("from_pooled", seeds=[1, 2, 3], earlier=[tmp_path / "all" / "comparison.json"])
    for key in ("runs", "run_statistics", "statistics", "per_case", "per_run"):
        assert from_pooled[key] == everything[key], key
    assert len(from_pooled["earlier_runs"]) == 6
    only_seed3, _ = compared("only_seed3", seeds=[3], earlier=[tmp_path / "all" / "comparison.json"])
    assert only_seed3["per_run"]["worseTrainer"] == {"fold 0 seed 3": everything["per_run"]["worseTrainer"]["fold 0 seed 3"]}
    # one written before per-run scores were stored holds only the pooled means: refused
    older = {k: v for k, v in everything.items() if k != "per_run"}
    (tmp_path / "older.json").write_text(json.dumps(older))
    with pytest.raises(SetupError, match="pools 3 runs"):
        compared("pooled", seeds=[2, 3], earlier=[tmp_path / "older.json"])
    with pytest.raises(SetupError, match="in both"):
        compared("twice", seeds=[1, 2, 3], earlier=[earlier, earlier])
    (tmp_path / "not_json").write_text("{")
    with pytest.raises(SetupError, match="not a comparison.json"):
        compared("broken", seeds=[1, 2, 3], earlier=[tmp_path / "not_json"])


def test_seeded_trainer_names():
    from nnunetv2_proto.training.seeding import split_seeded_name, worker_seeds
    assert split_seeded_name("nnUNetTrainerSIPL_cpuBudget_seed12") == ("nnUNetTrainerSIPL_cpuBudget", 12)
    assert split_seeded_name("nnUNetTrainerSIPL_cpuBudget") is None
    assert worker_seeds(1, 0, 2) == worker_seeds(1, 0, 2) and worker_seeds(1, 0, 2) != worker_seeds(2, 0, 2)
    assert len(set(worker_seeds(1, 0, 3) + worker_seeds(1, 1, 3))) == 6


def write_training_log(fold_folder: Path, pseudo_dice, iterations_per_epoch=None) -> None:
    """A checkpoint holding what nnU-Net's own logger records per epoch, saved the way nnU-Net saves it."""
    import torch
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    logger = MetaLogger(str(fold_folder), resume=False)
    for epoch, value in enumerate(pseudo_dice):
        logger.log("mean_fg_dice", float(value), epoch)
        logger.log("train_losses", -float(value), epoch)
        logger.log("val_losses", -float(value), epoch)
    torch.save({"logging": logger.get_checkpoint(), "current_epoch": len(pseudo_dice)},
               fold_folder / "checkpoint_final.pth")
    if iterations_per_epoch:
        (fold_folder / "training_timing.json").write_text(json.dumps({"iterations_per_epoch": iterations_per_epoch}))


def test_training_curves_say_when_the_baseline_had_not_levelled_off(tmp_path, monkeypatch):
    from nnunetv2_proto.evaluation.learning_curves import read_training_curve
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    tree = make_results_tree(tmp_path, {"removed": [0, 10, 20]})
    runs = tmp_path / "nnUNet_results" / tree["dataset"]
    climbing = np.linspace(0.2, 0.8, 10)  # 0.6 / 9 per epoch; the late windows are two epochs each
    flat = np.r_[np.linspace(0.2, 0.8, 6), [0.8, 0.8, 0.8, 0.8]]
    write_training_log(runs / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0", climbing, iterations_per_epoch=5)
    write_training_log(runs / "worseTrainer__nnUNetPlans__3d_fullres" / "fold_0", flat, iterations_per_epoch=5)
    curve = read_training_curve(runs / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0")
    assert curve.epochs == 10 and curve.late_rise() == pytest.approx(2 * 0.6 / 9)  # windows two epochs apart
    assert curve.ema_pseudo_dice[1] == pytest.approx(0.9 * climbing[0] + 0.1 * climbing[1])  # nnU-Net's own EMA
    out = compare(tree["dataset"], "3d_fullres", ["nnUNetTrainer", "worseTrainer"], folds=[0], output=tmp_path / "cmp",
                  num_processes=1, progress=lambda _: None)
    rows = {r["trainer"]: r for r in json.loads((out / "comparison.json").read_text())["training_curves"]}
    assert rows["nnUNetTrainer"]["steps"] == 50 and rows["nnUNetTrainer"]["late_rise"] == pytest.approx(2 * 0.6 / 9)
    assert rows["worseTrainer"]["late_rise"] == pytest.approx(0.0)
    markdown = (out / "comparison.md").read_text()
    assert "The baseline had not levelled off" in markdown and (out / "comparison_curves.png").is_file()
    # the same curves with the roles swapped: a flat baseline draws no warning
    out = compare(tree["dataset"], "3d_fullres", ["nnUNetTrainer", "worseTrainer"], folds=[0], baseline="worseTrainer",
                  output=tmp_path / "swapped", num_processes=1, progress=lambda _: None)
    assert "had not levelled off" not in (out / "comparison.md").read_text()
    # a damaged checkpoint costs its curve, never the comparison of finished predictions
    checkpoint = runs / "worseTrainer__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    out = compare(tree["dataset"], "3d_fullres", ["nnUNetTrainer", "worseTrainer"], folds=[0], output=tmp_path / "cut",
                  num_processes=1, progress=lambda _: None)
    assert "could be read from the checkpoint of: `worseTrainer` fold 0" in (out / "comparison.md").read_text()
    assert [r["trainer"] for r in json.loads((out / "comparison.json").read_text())["training_curves"]] == [
        "nnUNetTrainer"]


def load_run_archive():
    import importlib.util
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_archive.py"
    spec = importlib.util.spec_from_file_location("run_archive", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_archived_runs_compare_like_the_originals(tmp_path, monkeypatch):
    run_archive = load_run_archive()
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    tree = make_results_tree(tmp_path, {"removed": [0, 10, 20]})
    runs = tmp_path / "nnUNet_results" / tree["dataset"]
    folds = [runs / f"{t}__nnUNetPlans__3d_fullres" / "fold_0" for t in ("nnUNetTrainer", "worseTrainer")]
    write_training_log(folds[0], np.linspace(0.2, 0.8, 10), iterations_per_epoch=5)
    write_training_log(folds[1], np.full(10, 0.5))
    trainers = ["nnUNetTrainer", "worseTrainer"]
    original = json.loads((compare(tree["dataset"], "3d_fullres", trainers, folds=[0], output=tmp_path / "a",
                                   num_processes=1, progress=lambda _: None) / "comparison.json").read_text())
    archive = tmp_path / "archive"
    for fold_folder in folds:
        run_archive.export_run(fold_folder, archive)
    archived = archive / tree["dataset"] / "worseTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    assert (archived / "training_log.pth").is_file() and not (archived / "checkpoint_final.pth").exists()
    # on a machine without the runs: restore into an empty results folder, compare as before
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "elsewhere"))
    assert len(run_archive.restore_runs(archive, tmp_path / "elsewhere")) == 2
    restored = json.loads((compare(tree["dataset"], "3d_fullres", trainers, folds=[0], output=tmp_path / "b",
                                   num_processes=1, progress=lambda _: None) / "comparison.json").read_text())
    for key in ("statistics", "run_statistics", "per_case", "training_curves"):
        assert restored[key] == original[key], key
    assert restored["training_curves"][0]["steps"] == 50
    # a run without its final checkpoint is still training or was cut: refused, with the fix
    (folds[1] / "checkpoint_final.pth").unlink()
    with pytest.raises(SystemExit, match="not a finished run"):
        run_archive.export_run(folds[1], archive)


def test_archive_tells_a_bit_identical_retrain_from_a_different_one(tmp_path):
    import torch
    run_archive = load_run_archive()
    fold_folder = tmp_path / "nnUNet_results" / "Dataset001_Demo" / "nnUNetTrainer__nnUNetPlans__3d_cpu" / "fold_0"
    (fold_folder / "validation").mkdir(parents=True)
    (fold_folder / "validation" / "summary.json").write_text("{}")
    weights = {"conv.weight": torch.randn(4, 2, 3, 3), "norm.num_batches_tracked": torch.tensor(7)}
    torch.save({"logging": {}, "network_weights": weights}, fold_folder / "checkpoint_final.pth")
    archive = tmp_path / "archive"
    archived = run_archive.export_run(fold_folder, archive)
    assert not (archived / "checkpoint_final.pth").exists()
    assert "bit-identical" in run_archive.check_fingerprint(fold_folder, archive)
    # the retrain differs from the archived run in the last bit of one weight
    weights["conv.weight"][0, 0, 0, 0] = torch.nextafter(weights["conv.weight"][0, 0, 0, 0], torch.tensor(9.0))
    torch.save({"logging": {}, "network_weights": weights}, fold_folder / "checkpoint_final.pth")
    assert "differs from the archived run" in run_archive.check_fingerprint(fold_folder, archive)
