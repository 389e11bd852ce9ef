"""evaluate / compare / demo refuse what they cannot score correctly, never hang, never reuse stale numbers."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_proto.cli import main
from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.evaluation import runs as runs_module
from nnunetv2_proto.evaluation.compare import compare
from nnunetv2_proto.evaluation.evaluate import EvaluationPolicy, evaluate_folders
from test_evaluation import DATASET_JSON, make_results_tree, write


def cube_case(offset: int = 0) -> np.ndarray:
    seg = np.zeros((8, 10, 10), np.uint8)
    seg[2:6, 2 + offset:7 + offset, 2:7] = 1
    seg[6:8, 7:9, 7:9] = 2
    return seg


@pytest.fixture
def folders(tmp_path):
    """Three references, three matching predictions, a dataset.json."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    for i in range(3):
        write(cube_case(), gt / f"c{i}.nii.gz", (2.0, 1.0, 1.0))
        write(cube_case(offset=i % 2), pred / f"c{i}.nii.gz", (2.0, 1.0, 1.0))
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    return {"gt": gt, "pred": pred, "json": tmp_path / "dataset.json", "root": tmp_path}


def evaluate(f, **kwargs):
    return evaluate_folders(f["gt"], f["pred"], f["json"], num_processes=1, **kwargs)


def test_setup_error_survives_pickling():
    error = pickle.loads(pickle.dumps(SetupError("the problem", "the fix")))
    assert isinstance(error, SetupError) and (error.problem, error.fix) == ("the problem", "the fix")


def test_a_worker_error_with_the_default_process_count_is_reported_not_hung(folders):
    write(np.zeros((8, 10, 12), np.uint8), folders["pred"] / "c1.nii.gz", (2.0, 1.0, 1.0))  # wrong shape
    completed = subprocess.run([sys.executable, "-m", "nnunetv2_proto.cli", "evaluate", "--gt", folders["gt"],
                                "--pred", folders["pred"], "--dataset-json", folders["json"], "--out",
                                folders["root"] / "r.json"], capture_output=True, text=True, timeout=180)
    assert completed.returncode == 2, completed.stderr
    assert "c1.nii.gz has shape" in completed.stderr and "fix:" in completed.stderr
    assert "Traceback" not in completed.stderr and len(completed.stderr.strip().splitlines()) == 1


def test_missing_and_extra_predictions_are_errors_unless_allowed(folders):
    (folders["pred"] / "c2.nii.gz").unlink()
    with pytest.raises(SetupError, match=r"1 case\(s\) have no prediction.*c2.nii.gz"):
        evaluate(folders)
    result = evaluate(folders, policy=EvaluationPolicy(allow_missing=True))
    assert len(result["metric_per_case"]) == 2 and result["missing_predictions"] == ["c2.nii.gz"]
    write(cube_case(), folders["pred"] / "stray.nii.gz", (2.0, 1.0, 1.0))
    with pytest.raises(SetupError, match="stray.nii.gz"):
        evaluate(folders, policy=EvaluationPolicy(allow_missing=True))
    result = evaluate(folders, policy=EvaluationPolicy(allow_missing=True, allow_extra=True))
    assert result["skipped_extra_predictions"] == ["stray.nii.gz"]


@pytest.mark.parametrize("change", ["spacing", "origin", "direction"])
def test_geometry_that_differs_from_the_reference_is_an_error(folders, change):
    image = sitk.ReadImage(str(folders["pred"] / "c0.nii.gz"))
    if change == "spacing":
        image.SetSpacing(tuple(2 * s for s in image.GetSpacing()))
    elif change == "origin":
        image.SetOrigin((5.0, 0.0, 0.0))
    else:
        image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    sitk.WriteImage(image, str(folders["pred"] / "c0.nii.gz"))
    with pytest.raises(SetupError, match=f"c0.nii.gz has {change}"):
        evaluate(folders)
    assert len(evaluate(folders, policy=EvaluationPolicy(geometry_tolerance=None))["metric_per_case"]) == 3


@pytest.mark.parametrize("values,message", [
    (lambda s: np.where(s == 1, 7, s).astype(np.int16), r"labels \[7\]"),
    (lambda s: np.where(s == 1, -1, s.astype(np.int16)), r"labels \[-1\]"),
    (lambda s: s.astype(np.float32) * 0.37 + 100.0, "non-integer"),
    (lambda s: np.where(s == 1, np.nan, s).astype(np.float32), "NaN"),
])
def test_values_that_are_not_the_datasets_labels_are_errors(folders, values, message):
    reference = sitk.ReadImage(str(folders["gt"] / "c0.nii.gz"))
    bad = sitk.GetImageFromArray(values(cube_case()))
    bad.CopyInformation(reference)
    sitk.WriteImage(bad, str(folders["pred"] / "c0.nii.gz"))
    with pytest.raises(SetupError, match=message) as error:
        evaluate(folders)
    assert "c0.nii.gz" in str(error.value)


def test_damaged_files_are_errors_that_name_the_file(folders):
    content = (folders["pred"] / "c0.nii.gz").read_bytes()
    (folders["pred"] / "c0.nii.gz").write_bytes(content[: len(content) // 2])
    with pytest.raises(SetupError, match="c0.nii.gz is damaged or truncated"):
        evaluate(folders)
    (folders["pred"] / "c0.nii.gz").unlink()
    (folders["pred"] / "c0.nii.gz").symlink_to(folders["root"] / "nowhere.nii.gz")
    with pytest.raises(SetupError, match="c0.nii.gz is a dangling link"):
        evaluate(folders)


def test_bad_arguments_are_named_before_any_work(folders, capsys):
    base = ["evaluate", "--gt", str(folders["gt"]), "--pred", str(folders["pred"]), "-np", "1"]
    cases = [
        (["--out", str(folders["root"] / "r.json"), "--dataset-json", str(folders["root"] / "none.json")],
         "does not exist"),
        (["--out", str(folders["root"] / "r.json"), "--dataset-json", str(folders["pred"] / "c0.nii.gz")],
         "not readable JSON"),
        (["--out", str(folders["root"])], "is a folder"),
    ]
    (folders["root"] / "nolabels.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    cases.append((["--out", str(folders["root"] / "r.json"), "--dataset-json", str(folders["root"] / "nolabels.json")],
                  "no 'labels'"))
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(["evaluate", "--gt", str(folders["gt"]), "--pred", str(folders["root"] / "missing"),
                 "--out", str(folders["root"] / "r.json")]) == 2
    assert "prediction folder" in capsys.readouterr().err


def comparison_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    return make_results_tree(tmp_path, {"removed": [0, 10, 20, 30]})


def left_dice_n(out: Path) -> int:
    report = json.loads((out / "comparison.json").read_text())
    return next(r for r in report["statistics"] if r["trainer"] == "worseTrainer" and r["structure"] == "left"
                and r["metric"] == "Dice")["n"]


def test_compare_never_reuses_stale_scores(tmp_path, monkeypatch):
    tree = comparison_environment(tmp_path, monkeypatch)
    run = dict(folds=[0], output=tmp_path / "cmp", num_processes=1, progress=lambda _: None)
    trainers = ["nnUNetTrainer", "worseTrainer"]
    assert left_dice_n(compare(tree["dataset"], "3d_fullres", trainers, **run)) == 4
    validation = tmp_path / "nnUNet_results" / tree["dataset"] / "worseTrainer__nnUNetPlans__3d_fullres" / "fold_0" \
        / "validation"
    (validation / "c3.nii.gz").unlink()
    with pytest.raises(SetupError, match="c3.nii.gz"):
        compare(tree["dataset"], "3d_fullres", trainers, **run)
    out = compare(tree["dataset"], "3d_fullres", trainers, allow_missing=True, **run)
    assert left_dice_n(out) == 3  # paired on the common cases only, and it says so
    assert "`nnUNetTrainer`: 1 case(s) ['c3.nii.gz']" in (out / "comparison.md").read_text()
    regions = {**DATASET_JSON, "labels": {"background": 0, "both": [1, 2], "right": 2}, "regions_class_order": [1, 2]}
    (tmp_path / "nnUNet_preprocessed" / tree["dataset"] / "dataset.json").write_text(json.dumps(regions))
    out = compare(tree["dataset"], "3d_fullres", trainers, allow_missing=True, **run)
    assert json.loads((out / "comparison.json").read_text())["structures"] == ["both", "right"]


def test_compare_on_a_read_only_prediction_folder_caches_elsewhere(tmp_path, monkeypatch):
    tree = comparison_environment(tmp_path, monkeypatch)
    results = tmp_path / "nnUNet_results" / tree["dataset"]
    folders = [results / f"{t}__nnUNetPlans__3d_fullres" / "fold_0" / "validation" for t in ("nnUNetTrainer",
                                                                                             "worseTrainer")]
    for folder in folders:
        folder.chmod(0o555)
    # root may write anywhere whatever the mode bits say; answer as an unprivileged user would
    real_access = os.access
    monkeypatch.setattr(runs_module.os, "access",
                        lambda path, mode: False if Path(path) in folders else real_access(path, mode))
    try:
        out = compare(tree["dataset"], "3d_fullres", ["nnUNetTrainer", "worseTrainer"], folds=[0],
                      output=tmp_path / "cmp", num_processes=1, progress=lambda _: None)
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert left_dice_n(out) == 4
    assert not any((f / runs_module.CACHE_NAME).exists() for f in folders)
    assert len(list((tmp_path / "user_cache" / "nnunetv2_proto" / "metrics").glob("*.json"))) == 2


def test_comparison_json_is_standard_json(tmp_path, monkeypatch):
    tree = comparison_environment(tmp_path, monkeypatch)
    out = compare(tree["dataset"], "3d_fullres", ["nnUNetTrainer", "worseTrainer"], folds=[0],
                  output=tmp_path / "cmp", num_processes=1, progress=lambda _: None)

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    report = json.loads((out / "comparison.json").read_text(), parse_constant=refuse)
    baseline_row = next(r for r in report["statistics"] if r["trainer"] == "nnUNetTrainer")
    assert baseline_row["p_wilcoxon"] is None


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path):
    from nnunetv2_proto.demo import run_demo
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "results.md").write_text("my notes")
    (workdir / "comparison").mkdir()
    before = sorted((p.relative_to(workdir), p.read_bytes() if p.is_file() else None) for p in workdir.rglob("*"))
    with pytest.raises(SetupError, match="is not a demo work folder"):
        run_demo(workdir, report=lambda _: None)
    assert sorted((p.relative_to(workdir), p.read_bytes() if p.is_file() else None)
                  for p in workdir.rglob("*")) == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SetupError, match="is a file"):
        run_demo(tmp_path / "afile", report=lambda _: None)


def test_cli_names_bad_arguments_of_the_other_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    dataset = tmp_path / "pre" / "Dataset555_Lists"
    dataset.mkdir(parents=True)
    (dataset / "splits_final.json").write_text(json.dumps([{"train": ["a", "b"], "val": ["c"]}]))
    for clash in ("Dataset556_One", "Dataset556_Other"):  # nnU-Net's lookup refuses an ambiguous id
        (tmp_path / "pre" / clash).mkdir()
    for argv, message in [
        (["make-labeled-list", "-d", "555", "-n", "1", "--group-by", "patient(\\d+"], "not a valid regular expression"),
        (["make-labeled-list", "-d", "555", "-n", "1", "--folds", "-1"], "fold -1 does not exist"),
        (["make-labeled-list", "-d", "555", "-n", "1", "--out", str(tmp_path / "no" / "x.json")], "does not exist"),
        (["make-demo-dataset", "--dataset-id", "-5"], "outside nnU-Net's range"),
        (["make-demo-dataset", "--dataset-id", "1234"], "outside nnU-Net's range"),
        (["make-demo-dataset", "--name", "a/b"], "not a plain folder name"),
        (["make-labeled-list", "-d", "556", "-n", "1"], "more than one dataset has the id 556"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "fix:" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_doctor_does_not_advise_mkdir_for_a_variable_naming_a_file(tmp_path, monkeypatch):
    from nnunetv2_proto.doctor import _check_folders
    (tmp_path / "afile").write_text("x")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / "afile"))
    checks = _check_folders()
    assert all(not c.ok and "is a file" in c.detail and "mkdir" not in c.fix for c in checks)
