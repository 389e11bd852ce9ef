import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_proto.cli import main
from nnunetv2_proto.demo_dataset import DemoDatasetSpec, write_demo_dataset
from nnunetv2_proto.environment import SetupError, trainer_directory

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_package():
    from setuptools import find_packages
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = set(find_packages(str(ROOT), include=["nnunetv2_proto", "nnunetv2_proto.*"]))
    assert found | {"nnunetv2_proto.trainers"} == listed


def test_a_regular_wheel_ships_the_trainers(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert "nnunetv2_proto/trainers/nnUNetTrainerSIPL.py" in names
    assert "nnunetv2_proto/trainers/nnUNetTrainerMPERSemi.py" in names
    assert not any(n.startswith("tests/") for n in names)


def test_trainer_path_points_at_the_trainer_modules(capsys):
    assert main(["trainer-path"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == trainer_directory() and (printed / "nnUNetTrainerSIPL.py").is_file()


def test_doctor_fails_with_a_fix_then_passes_after_the_export(nnunet_env, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_extTrainer")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] nnUNet_extTrainer" in out and "export nnUNet_extTrainer=$(nnunetv2-proto trainer-path)" in out
    monkeypatch.setenv("nnUNet_extTrainer", str(trainer_directory()))
    assert main(["doctor"]) == 0
    assert "project trainers resolve through nnU-Net's lookup" in capsys.readouterr().out


def test_no_project_trainer_is_shadowed_by_a_builtin_one():
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2_proto.doctor import project_trainers
    folder = str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer")
    for name in project_trainers():
        assert recursive_find_python_class(folder, name, "nnunetv2.training.nnUNetTrainer") is None, name


def test_budget_variants_share_one_budget_per_suffix():
    """Every ``_cpuBudget`` trainer trains 200 steps, every ``_cpuBudgetLong`` one 1000 and every ``_cpuBudgetXL``
    one 3000, each with a twin at the next shorter budget (but a two-stage run from an XL source, which says so
    before its own budget: ``..._fromLabeledXL_cpuBudgetLong``)."""
    from nnunetv2_proto.doctor import project_trainers
    trainers = project_trainers()
    steps = {name: cls.budget_epochs * cls.budget_iterations_per_epoch for name, cls in trainers.items()
             if name.endswith(("_cpuBudget", "_cpuBudgetLong", "_cpuBudgetXL"))}
    short_ones = [n for n in steps if n.endswith("_cpuBudget")]
    assert short_ones and all(steps[n] == 200 for n in short_ones)
    for suffix, budget, shorter in (("Long", 1000, ""), ("XL", 3000, "Long")):
        longer_ones = [n for n in steps if n.endswith("_cpuBudget" + suffix)]
        assert {f"nnUNetTrainer{family}_cpuBudget{suffix}" for family in ("", "SIPL", "MPER")} <= set(longer_ones)
        for name in longer_ones:
            assert steps[name] == budget, name
            assert "XL_cpuBudget" in name or name[: -len(suffix)] + shorter in steps, name


def test_every_two_stage_trainer_names_a_source_that_exists_with_the_same_budget():
    """A ``_fromX`` trainer loads the run of ``source_trainer``: that trainer must exist, and a budget variant must
    start from the same budget, or from the XL budget where its name says ``_from<Source>XL_`` (a typo would only
    surface after a whole first-stage run)."""
    from nnunetv2_proto.doctor import project_trainers
    from nnunetv2_proto.training.initial_weights import StartFromTrainedModelMixin
    trainers = project_trainers()
    two_stage = {n: c for n, c in trainers.items() if issubclass(c, StartFromTrainedModelMixin)}
    assert {"nnUNetTrainerBCP_labeledList_fromLabeled_cpuBudgetLong",
            "nnUNetTrainerBCP_labeledList_fromLabeledXL_cpuBudgetLong"} <= set(two_stage)
    for name, cls in two_stage.items():
        assert cls.source_trainer == "nnUNetTrainer" or cls.source_trainer in trainers, name
        if "XL_cpuBudget" in name:
            assert cls.source_trainer.endswith("_cpuBudgetXL"), name
            continue
        for suffix in ("_cpuBudget", "_cpuBudgetLong"):
            assert name.endswith(suffix) == cls.source_trainer.endswith(suffix), name


def test_every_two_stage_budget_run_has_a_baseline_for_both_stages_steps():
    """The fair baseline of ``<X>_from<Source>_cpuBudget[Long]`` is ``<Source>Double`` (``<Source>PlusLong`` for an
    XL source): the source's family trained for the source run's steps plus the two-stage run's own."""
    from nnunetv2_proto.doctor import project_trainers
    from nnunetv2_proto.training.initial_weights import StartFromTrainedModelMixin

    def steps(cls) -> int:
        return cls.budget_epochs * cls.budget_iterations_per_epoch

    trainers = project_trainers()
    two_stage = {n: c for n, c in trainers.items()
                 if issubclass(c, StartFromTrainedModelMixin) and n.endswith(("_cpuBudget", "_cpuBudgetLong"))}
    assert {"nnUNetTrainerBCP_8labeled_fromLabeled_cpuBudget", "nnUNetTrainerMPER_fromVanilla_cpuBudgetLong",
            "nnUNetTrainer_8labeled_fromLabeled_cpuBudget", "nnUNetTrainerBCP_8labeled_fromLabeled_cpuBudgetLong",
            "nnUNetTrainerMPERSemi_8labeled_fromLabeled_cpuBudgetLong",
            "nnUNetTrainer_labeledList_fromLabeledXL_cpuBudgetLong"} <= set(two_stage)  # third, last: restart controls
    for name, cls in two_stage.items():
        source = trainers[cls.source_trainer]
        baseline_name = cls.source_trainer + ("PlusLong" if cls.source_trainer.endswith("_cpuBudgetXL") else "Double")
        baseline = trainers.get(baseline_name)
        assert baseline is not None, f"{name}: no {baseline_name}"
        assert steps(baseline) == steps(source) + steps(cls), name
        family = source.__bases__[-1]  # the trainer the source's budget mixin was put on
        assert family in baseline.__mro__, name  # the same family (labelled subset included), only longer


def test_plan_cpu_errors_name_the_problem_and_the_fix(nnunet_env, capsys):
    assert main(["plan-cpu", "-d", "777"]) == 2
    assert "no dataset with id 777" in capsys.readouterr().err
    write_demo_dataset(Path(nnunet_env["nnUNet_raw"]), 992, "Unplanned", DemoDatasetSpec(num_cases=5),
                       progress=lambda _: None)
    (Path(nnunet_env["nnUNet_preprocessed"]) / "Dataset992_Unplanned").mkdir()
    assert main(["plan-cpu", "-d", "992"]) == 2
    err = capsys.readouterr().err
    assert "nnUNetPlans.json does not exist" in err and "--no_pp" in err


def test_unset_nnunet_folders_are_reported_with_the_export(monkeypatch, capsys):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)
    assert main(["plan-cpu", "-d", "501"]) == 2
    assert "export nnUNet_raw=" in capsys.readouterr().err


def test_demo_dataset_is_deterministic_and_never_overwrites(tmp_path):
    spec = DemoDatasetSpec(num_cases=5, shape_zyx=(16, 32, 32), seed=3)
    first = write_demo_dataset(tmp_path / "a", 990, "ProtoDemo", spec, progress=lambda _: None)
    second = write_demo_dataset(tmp_path / "b", 990, "ProtoDemo", spec, progress=lambda _: None)
    for kind in ("imagesTr/demo_002_0000.nii.gz", "labelsTr/demo_002.nii.gz"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(first / kind)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(second / kind)))
        assert np.array_equal(a, b)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(first / "labelsTr" / "demo_002.nii.gz")))
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert write_demo_dataset(tmp_path / "a", 990, "ProtoDemo", spec, progress=lambda _: None) == first
    with pytest.raises(SetupError, match="different dataset"):
        write_demo_dataset(tmp_path / "a", 990, "ProtoDemo", DemoDatasetSpec(num_cases=6, shape_zyx=(16, 32, 32)),
                           progress=lambda _: None)
    with pytest.raises(SetupError, match="already used"):
        write_demo_dataset(tmp_path / "a", 990, "OtherName", spec, progress=lambda _: None)
