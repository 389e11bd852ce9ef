"""nnU-Net's real entry points on a tiny generated dataset: plan, CPU preset, train, predict, evaluate, resume.

Trainers come from nnUNet_extTrainer (the plugin's folder plus tests/ext_trainers, which
holds tiny-budget subclasses), exactly as a user's nnUNetv2_train would find them.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import nnunet_environment
from nnunetv2_proto.demo_dataset import DemoDatasetSpec, write_demo_dataset

DATASET_ID = 991
DATASET = "Dataset991_ProtoTest"
CONFIGURATION = "3d_cpu"
TRAINERS = ("nnUNetTrainer_testBudget", "nnUNetTrainerSIPL_testBudget", "nnUNetTrainerMPER_testBudget",
            "nnUNetTrainerBCP_testBudget", "nnUNetTrainerMPERSemi_testBudget")


def command(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def run(args, env, extra_env=None, expect=0):
    completed = subprocess.run([str(a) for a in args], env={**os.environ, **env, **(extra_env or {})},
                               capture_output=True, text=True)
    assert completed.returncode == expect, (f"{' '.join(map(str, args))} exited {completed.returncode}\n"
                                            f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    return completed


def output_folder(env, trainer, fold=0) -> Path:
    return Path(env["nnUNet_results"]) / DATASET / f"{trainer}__nnUNetPlans__{CONFIGURATION}" / f"fold_{fold}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_environment(root)
    write_demo_dataset(Path(env["nnUNet_raw"]), DATASET_ID, "ProtoTest",
                       DemoDatasetSpec(num_cases=6, shape_zyx=(16, 32, 32), seed=1), progress=lambda _: None)
    run([command("nnUNetv2_plan_and_preprocess"), "-d", DATASET_ID, "--verify_dataset_integrity", "--no_pp",
         "-np", "1"], env)
    run([command("nnunetv2-proto"), "plan-cpu", "-d", DATASET_ID, "-np", "1"], env)
    for trainer in TRAINERS:
        run([command("nnUNetv2_train"), DATASET_ID, CONFIGURATION, "0", "-tr", trainer, "-device", "cpu"], env)
    splits = json.loads((Path(env["nnUNet_preprocessed"]) / DATASET / "splits_final.json").read_text())
    images = root / "validation_images"
    images.mkdir()
    for case in splits[0]["val"]:
        shutil.copy(Path(env["nnUNet_raw"]) / DATASET / "imagesTr" / f"{case}_0000.nii.gz", images)
    for trainer in TRAINERS:
        run([command("nnUNetv2_predict"), "-i", images, "-o", root / "predictions" / trainer, "-d", DATASET_ID,
             "-c", CONFIGURATION, "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    return {"root": root, "env": env, "val_cases": splits[0]["val"], "images": images}


def test_plan_cpu_adds_a_narrow_configuration_inheriting_from_3d_fullres(workspace):
    plans = json.loads((Path(workspace["env"]["nnUNet_preprocessed"]) / DATASET / "nnUNetPlans.json").read_text())
    cpu = plans["configurations"][CONFIGURATION]
    assert cpu["inherits_from"] == "3d_fullres"
    assert cpu["architecture"]["arch_kwargs"]["features_per_stage"][0] == 16
    assert max(cpu["architecture"]["arch_kwargs"]["features_per_stage"]) <= 256
    assert (Path(workspace["env"]["nnUNet_preprocessed"]) / DATASET / cpu["data_identifier"]).is_dir()


@pytest.mark.parametrize("trainer", TRAINERS)
def test_train_predict_evaluate_with_nnunets_commands(workspace, trainer):
    env = workspace["env"]
    folder = output_folder(env, trainer)
    assert (folder / "checkpoint_final.pth").is_file()
    # nnU-Net's own validation after training ran through the network (deep supervision off)
    validation = json.loads((folder / "validation" / "summary.json").read_text())
    assert 0.0 <= validation["foreground_mean"]["Dice"] <= 1.0
    predictions = workspace["root"] / "predictions" / trainer
    gt_folder = Path(env["nnUNet_raw"]) / DATASET / "labelsTr"
    for case in workspace["val_cases"]:
        predicted = sitk.ReadImage(str(predictions / f"{case}.nii.gz"))
        reference = sitk.ReadImage(str(gt_folder / f"{case}.nii.gz"))
        assert predicted.GetSize() == reference.GetSize()
        assert np.allclose(predicted.GetSpacing(), reference.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1, 2, 3}
    run([command("nnUNetv2_evaluate_folder"), gt_folder, predictions, "-djfile",
         Path(env["nnUNet_raw"]) / DATASET / "dataset.json", "-pfile", folder.parent / "plans.json", "--chill"], env)
    summary = json.loads((predictions / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == len(workspace["val_cases"])
    assert all(np.isfinite(v["Dice"]) or np.isnan(v["Dice"]) for v in summary["mean"].values())


@pytest.mark.parametrize("trainer", TRAINERS[1:])
def test_the_predictor_loads_a_deep_supervision_trained_model_strictly(workspace, trainer, monkeypatch):
    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(output_folder(workspace["env"], trainer).parent), (0,))
    checkpoint = torch.load(output_folder(workspace["env"], trainer) / "checkpoint_final.pth", weights_only=False)
    assert predictor.network.decoder.deep_supervision is False
    assert set(predictor.network.state_dict()) == set(checkpoint["network_weights"])


def test_mper_prediction_equals_the_linear_heads_output(workspace, monkeypatch):
    """nnUNetv2_predict with an MPER model = nnU-Net predicting with a vanilla network holding the same weights."""
    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    folder = output_folder(workspace["env"], "nnUNetTrainerMPER_testBudget")
    reference = nnUNetPredictor(device=torch.device("cpu"))
    reference.initialize_from_trained_model_folder(str(folder.parent), (0,))
    vanilla = nnUNetTrainer.build_network_architecture(
        reference.plans_manager, reference.configuration_manager, 1,
        reference.label_manager.num_segmentation_heads, enable_deep_supervision=False)
    weights = torch.load(folder / "checkpoint_final.pth", weights_only=False)["network_weights"]
    # MPER's state = the vanilla network's + the prototype buffers
    assert set(weights) - set(vanilla.state_dict()) == {"classifier.prototypes", "classifier.initialized"}
    linear_weights = {k: v for k, v in weights.items() if k in vanilla.state_dict()}
    vanilla.load_state_dict(linear_weights, strict=True)
    linear = nnUNetPredictor(device=torch.device("cpu"))
    linear.manual_initialization(vanilla, reference.plans_manager, reference.configuration_manager,
                                 [linear_weights], reference.dataset_json, "nnUNetTrainer",
                                 reference.allowed_mirroring_axes)
    out = workspace["root"] / "linear_reference"
    linear.predict_from_files(str(workspace["images"]), str(out), save_probabilities=False, overwrite=True,
                              num_processes_preprocessing=1, num_processes_segmentation_export=1)
    for case in workspace["val_cases"]:
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(workspace["root"] / "predictions" /
                                                         "nnUNetTrainerMPER_testBudget" / f"{case}.nii.gz")))
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("trainer,stop_after", [("nnUNetTrainerSIPL_resumeProbe", 0),
                                                 ("nnUNetTrainerMPER_resumeProbe", 1),
                                                 ("nnUNetTrainerMPERSemi_resumeProbe", 1)])
def test_resume_with_c_restores_the_head_state(workspace, trainer, stop_after, tmp_path):
    env = workspace["env"]
    train = [command("nnUNetv2_train"), DATASET_ID, CONFIGURATION, "1", "-tr", trainer, "-device", "cpu"]
    run(train, env, {"PROTO_TEST_STOP_AFTER_EPOCH": str(stop_after)}, expect=75)  # killed after that epoch
    latest = output_folder(env, trainer, 1) / "checkpoint_latest.pth"
    saved = torch.load(latest, weights_only=False)
    run(train + ["--c"], env, {"PROTO_TEST_RESUME_DUMP": str(tmp_path / "restored.pt")})
    restored = torch.load(tmp_path / "restored.pt", weights_only=False)
    assert restored["epoch"] == saved["current_epoch"] == stop_after + 1
    assert set(restored["network"]) == set(saved["network_weights"])
    for key, value in saved["network_weights"].items():
        assert torch.equal(restored["network"][key], value), key
    if "SIPL" in trainer:
        assert "head.smg.tau" in saved["network_weights"]
    else:  # the prototypes were initialised before the interruption and come back as they were
        assert bool(saved["network_weights"]["classifier.initialized"].all())
    if "MPER_" in trainer:  # the ramp continues where it was: lambda of the resumed epoch, used in its loss
        from nnunetv2_proto.training.schedules import MPER_PHASES
        expected = replace(MPER_PHASES, min_warmup_iterations=0, rampup_fraction=1.0).main_loss_weight(2, 3, 3)
        assert 0.05 < expected < 0.95 and restored["main_loss_weight"] == pytest.approx(expected)
        log = sorted(output_folder(env, trainer, 1).glob("training_log_*.txt"))[-1].read_text()
        assert f"'lambda': {round(expected, 4)}" in log.split("Epoch 2")[-1]
    if "Semi" in trainer:  # the teacher and the labelled subset come back too
        extra = saved["nnunetv2_proto_state"]
        assert restored["extra"]["labeled_cases"] == extra["labeled_cases"] and len(extra["labeled_cases"]) == 2
        for key, value in extra["teacher"].items():
            assert torch.equal(restored["extra"]["teacher"][key], value), key
    assert (output_folder(env, trainer, 1) / "checkpoint_final.pth").is_file()


def test_seeded_runs_repeat_bit_for_bit_and_two_seeds_differ(workspace):
    """<Trainer>_seed<N> through nnUNetv2_train: same seed, same first epoch (one augmentation worker, as the
    environment sets); another seed, another run. The seed is recorded next to the checkpoints."""
    env = workspace["env"]

    def first_epoch(trainer: str):
        folder = output_folder(env, trainer, 3)
        shutil.rmtree(folder, ignore_errors=True)
        run([command("nnUNetv2_train"), DATASET_ID, CONFIGURATION, "3", "-tr", trainer, "-device", "cpu"], env,
            {"PROTO_TEST_STOP_AFTER_EPOCH": "0"}, expect=75)
        checkpoint = torch.load(folder / "checkpoint_latest.pth", weights_only=False)
        record = json.loads((folder / "run_seed.json").read_text())
        assert record == {"seed": int(trainer[-1]), "trainer": trainer, "base_trainer": "nnUNetTrainer_testBudget"}
        return checkpoint["logging"]["train_losses"], checkpoint["network_weights"]

    losses, weights = first_epoch("nnUNetTrainer_testBudget_seed1")
    losses_again, weights_again = first_epoch("nnUNetTrainer_testBudget_seed1")
    other_losses, other_weights = first_epoch("nnUNetTrainer_testBudget_seed2")
    assert len(losses) == 1 and losses == losses_again
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
    assert losses != other_losses and not all(torch.equal(weights[k], other_weights[k]) for k in weights)


def test_resuming_from_an_incompatible_checkpoint_names_the_problem(workspace, monkeypatch):
    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2_proto.environment import SetupError
    trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, 0, "nnUNetTrainerMPER_testBudget",
                                    device=torch.device("cpu"))
    sipl_checkpoint = output_folder(workspace["env"], "nnUNetTrainerSIPL_testBudget") / "checkpoint_final.pth"
    with pytest.raises(SetupError, match="head spec"):
        trainer.load_checkpoint(str(sipl_checkpoint))


def test_semi_supervised_training_never_reads_labels_of_unlabelled_cases(workspace, monkeypatch):
    """Corrupt the unlabelled cases' label files and label-derived sampling locations: one seeded
    self-training step (teacher pseudo labels, copy-paste, prototypes) must not change by one bit."""
    import pickle
    import random

    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # single-threaded augmentation: reproducible batches
    from nnunetv2.run.run_training import get_trainer_from_args

    def one_step():
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, 2, "nnUNetTrainerMPERSemi_testBudget",
                                        device=torch.device("cpu"))
        trainer.initialize()
        trainer.current_epoch = trainer.warmup_epochs  # self-training: teacher and unlabelled stream active
        trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
        trainer.on_train_epoch_start()
        trainer.train_step(next(trainer.dataloader_train))
        trainer.train_step(next(trainer.dataloader_train))
        state = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        return state, trainer.labeled_split()[1]

    reference, unlabeled = one_step()
    preprocessed = Path(workspace["env"]["nnUNet_preprocessed"]) / DATASET
    data_folder = preprocessed / "nnUNetPlans_3d_cpu"
    touched = [data_folder / f"{c}_seg.b2nd" for c in unlabeled] + [data_folder / f"{c}.pkl" for c in unlabeled] + \
              [preprocessed / "gt_segmentations" / f"{c}.nii.gz" for c in unlabeled] + \
              [Path(workspace["env"]["nnUNet_raw"]) / DATASET / "labelsTr" / f"{c}.nii.gz" for c in unlabeled]
    backups = {p: p.read_bytes() for p in touched}
    try:
        for path in touched:
            if path.suffix == ".pkl":  # label-derived foreground locations pointing somewhere else
                properties = pickle.loads(backups[path])
                properties["class_locations"] = {k: np.zeros((5, 4), dtype=np.int64)
                                                 for k in properties["class_locations"]}
                path.write_bytes(pickle.dumps(properties))
            else:
                path.write_bytes(b"not a label file")
        corrupted, _ = one_step()
    finally:
        for path, content in backups.items():
            path.write_bytes(content)
    assert unlabeled and set(reference) == set(corrupted)
    for key in reference:
        assert torch.equal(reference[key], corrupted[key]), key


def test_compare_and_benchmark_heads_work_on_real_nnunet_results(workspace, tmp_path):
    env = workspace["env"]
    out = tmp_path / "comparison"
    run([command("nnunetv2-proto"), "compare", "-d", DATASET_ID, "-c", CONFIGURATION, "-f", "0", "-tr",
         "nnUNetTrainer_testBudget", "nnUNetTrainerSIPL_testBudget", "nnUNetTrainerMPER_testBudget", "--out", out,
         "-np", "1"], env)
    report = json.loads((out / "comparison.json").read_text())
    assert report["baseline"] == "nnUNetTrainer_testBudget" and not report["missing"]
    assert set(report["structures"]) == {"nodule", "vessel", "cyst"}
    assert all(len(cases) == len(workspace["val_cases"])
               for cases in report["per_case"]["nnUNetTrainerSIPL_testBudget"]["Dice"].values())
    # the training curves come from the checkpoints nnU-Net wrote: three epochs per tiny run
    assert sorted((r["trainer"], r["epochs"]) for r in report["training_curves"]) == [
        (t, 3) for t in ("nnUNetTrainerMPER_testBudget", "nnUNetTrainerSIPL_testBudget", "nnUNetTrainer_testBudget")]
    assert (out / "comparison_curves.png").is_file()
    bench = tmp_path / "bench.json"
    run([command("nnunetv2-proto"), "benchmark-heads", "-d", DATASET_ID, "-c", CONFIGURATION, "-tr",
         "nnUNetTrainer_testBudget", "nnUNetTrainerSIPL_testBudget", "nnUNetTrainerBCP_testBudget", "--steps", "1",
         "--warmup", "1", "--device", "cpu", "--out", bench], env)
    results = json.loads(bench.read_text())["results"]
    assert [r["trainer"] for r in results] == ["nnUNetTrainer_testBudget", "nnUNetTrainerSIPL_testBudget",
                                               "nnUNetTrainerBCP_testBudget"]
    assert results[0]["train_step_ratio"] == 1.0 and results[1]["train_step_s"] > 0
    assert all(r["peak_memory_bytes"] > 0 and "live memory" in r["memory_kind"] for r in results)
    assert not list((Path(env["nnUNet_results"]) / DATASET).glob("*benchmark*"))  # nothing written there


def test_demo_report_scores_real_predictions_of_exactly_the_validation_cases(workspace, tmp_path, monkeypatch):
    """The demo's last step on real nnU-Net outputs: compare (strict: every validation case predicted), table,
    CSV and figure."""
    from nnunetv2_proto.demo import DemoPaths
    from nnunetv2_proto.demo_report import collect_results, write_report
    root = workspace["root"]
    paths = DemoPaths(tmp_path)
    for name in ("nnUNet_raw", "nnUNet_results", "predictions"):
        (tmp_path / name).symlink_to(root / name)
    paths.validation_images.symlink_to(workspace["images"])
    paths.validation_labels.mkdir()
    for case in workspace["val_cases"]:
        shutil.copy(root / "nnUNet_raw" / DATASET / "labelsTr" / f"{case}.nii.gz", paths.validation_labels)
    trainers = list(TRAINERS[:3])
    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)
    results = collect_results(paths, DATASET, trainers, {t: 1.0 for t in trainers}, CONFIGURATION)
    assert [r.trainer for r in results] == trainers
    assert all(0.0 <= r.mean_dice <= 1.0 for r in results)
    table = write_report(paths, DATASET, results, workspace["val_cases"]).read_text()
    assert "wall-time ratio to vanilla" in table and all(t in table for t in trainers)
    assert (tmp_path / "results.png").is_file()
    assert (tmp_path / "results.csv").read_text().count("\n") == len(trainers) + 1


GOLDEN_STEPS = Path(__file__).resolve().parent / "data" / "golden_training_steps.json"
GOLDEN_TRAINERS = ("nnUNetTrainerSIPL_testBudget", "nnUNetTrainerMPER_testBudget", "nnUNetTrainerBCP_testBudget",
                   "nnUNetTrainerMPERSemi_testBudget")
# Another x86 CPU (AVX2 against AVX-512 kernels in oneDNN and ATen) sums in another order; over three SGD steps
# with momentum 0.99, k-means assignments and prototype winners, that moves each tensor's update by up to 1.5%
# (measured: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 against this machine's defaults), while the
# initial weights are bit-identical. So the guard compares the update, not the weights: the weights' plain
# sums, the old guard, cancel to small numbers and moved by 1e-4 to 1e-3 of them on CI's host.
UPDATE_RTOL = 0.05
SAMPLE_RTOL = 0.2
UPDATE_SAMPLE_SIZE = 8
# tensors whose gradient is zero by construction (conv biases before instance norm) move by rounding only
NO_UPDATE = 1e-7


def update_signature(before: dict, after: dict) -> dict:
    """Per parameter tensor (aliases once): the update's size, L2 norm and its values at a few fixed positions."""
    sizes, norms, samples, seen = {}, {}, {}, set()
    for key in sorted(after):
        if not after[key].is_floating_point() or after[key].data_ptr() in seen:
            continue
        seen.add(after[key].data_ptr())
        update = (after[key].double() - before[key].double()).flatten()
        positions = torch.randperm(update.numel(), generator=torch.Generator().manual_seed(update.numel()))
        sizes[key], norms[key] = update.numel(), float(update.norm())
        samples[key] = update[positions[:UPDATE_SAMPLE_SIZE]].tolist()
    return {"update_sizes": sizes, "update_norms": norms, "update_samples": samples}


def update_mismatches(measured: dict, expected: dict) -> list:
    """(tensor, what differs, relative difference) for each update that differs by more than its tolerance."""
    wrong = []
    for key, norm in expected["update_norms"].items():
        ours = measured["update_norms"][key]
        if norm < NO_UPDATE:
            if ours >= 10 * NO_UPDATE:
                wrong.append((key, "moves where the recording did not", ours))
            continue
        if abs(ours - norm) > UPDATE_RTOL * norm:
            wrong.append((key, "update norm", abs(ours - norm) / norm))
        sample, recorded = torch.tensor(measured["update_samples"][key]), torch.tensor(expected["update_samples"][key])
        # what a few entries of this update weigh: an update of the same size in another direction lands at ~1.4
        sample_scale = norm * (len(recorded) / expected["update_sizes"][key]) ** 0.5
        if float((sample - recorded).norm()) > SAMPLE_RTOL * sample_scale:
            wrong.append((key, "update direction", float((sample - recorded).norm()) / sample_scale))
    return wrong


def seeded_steps(workspace, trainer_name: str, monkeypatch) -> dict:
    """Three seeded training steps in each family's costliest phase: losses, their parts, and the update."""
    import hashlib
    import random
    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # in-process augmentation: the batches follow the seed
    from nnunetv2.run.run_training import get_trainer_from_args
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, 2, trainer_name, device=torch.device("cpu"))
    trainer.initialize()
    initial = {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}
    trainer.current_epoch = getattr(trainer, "warmup_epochs", 0)  # prototypes / self-training on
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.on_train_epoch_start()
    steps = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(3)]
    state = trainer.network.state_dict()
    digest = hashlib.sha256(b"".join(state[k].detach().contiguous().numpy().tobytes() for k in sorted(state)))
    return {"steps": [{k: float(v) for k, v in s.items()} for s in steps], **update_signature(initial, state),
            "weights_sha256": digest.hexdigest()}


@pytest.mark.parametrize("trainer", GOLDEN_TRAINERS)
def test_training_steps_match_the_recorded_behaviour(workspace, trainer, monkeypatch):
    """Refactoring guard: seeded steps of every family equal the values recorded before the code moved.
    Bit-for-bit on the machine that recorded them (weights_sha256); to float tolerance elsewhere."""
    if os.environ.get("PROTO_RECORD_GOLDEN"):
        recorded = json.loads(GOLDEN_STEPS.read_text()) if GOLDEN_STEPS.is_file() else {}
        recorded[trainer] = seeded_steps(workspace, trainer, monkeypatch)
        GOLDEN_STEPS.parent.mkdir(exist_ok=True)
        GOLDEN_STEPS.write_text(json.dumps(recorded, indent=1, sort_keys=True))
    expected = json.loads(GOLDEN_STEPS.read_text())[trainer]
    measured = seeded_steps(workspace, trainer, monkeypatch)
    if os.environ.get("PROTO_GOLDEN_BITWISE"):  # on the machine that recorded them: not one bit may differ
        assert measured["weights_sha256"] == expected["weights_sha256"] and measured["steps"] == expected["steps"]
    assert [set(s) for s in measured["steps"]] == [set(s) for s in expected["steps"]]
    for ours, theirs in zip(measured["steps"], expected["steps"]):
        for key in theirs:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (trainer, key)
    assert set(measured["update_norms"]) == set(expected["update_norms"])
    assert update_mismatches(measured, expected) == [], trainer


def test_sipl_training_log_shows_its_diagnostics_every_epoch(workspace):
    folder = output_folder(workspace["env"], "nnUNetTrainerSIPL_testBudget")
    log = "\n".join(p.read_text() for p in folder.glob("training_log_*.txt"))
    lines = [line for line in log.splitlines() if "SIPL diagnostics:" in line]
    assert len(lines) == 3  # one per epoch
    assert all("SMG pseudo-mask Dice (last layer, validation) [" in line and "filter keeps" in line
               and "proposal norms: instance" in line and "prototypes differ between samples by" in line
               for line in lines)


def test_mper_training_log_gives_its_prototype_slots_back(workspace):
    """The per-epoch slot line of a real MPER run reads back as counts for every (class, prototype) slot
    (benchmarks/prototype_slots.py plots them)."""
    from nnunetv2_proto.evaluation.prototype_slots import read_slot_history
    history = read_slot_history(output_folder(workspace["env"], "nnUNetTrainerMPER_testBudget"))
    assert history is not None and history.epochs.tolist() == [1, 2]  # one warm-up epoch, then prototypes
    assert history.counts.shape == (2, 4, 3) and history.counts.sum() > 0  # 4 classes x 3 prototypes
    assert ((history.moved >= 0) & (history.moved <= 2)).all()


def in_process_trainer(workspace, monkeypatch, name: str, fold: int = 2):
    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    from nnunetv2.run.run_training import get_trainer_from_args
    torch.manual_seed(0)
    trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, fold, name, device=torch.device("cpu"))
    trainer.initialize()
    return trainer


@pytest.mark.parametrize("name", ["nnUNetTrainerMPER_testBudget", "nnUNetTrainerMPER_balancedSlots_testBudget"])
def test_prototypes_come_from_eval_mode_embeddings_after_warmup_and_the_first_update_uses_them(
        workspace, monkeypatch, name):
    """No embedding is sampled during warm-up; at the first prototype epoch the sample is taken with the
    network in eval mode, k-means runs before the first prototype step, and that step's EMA update
    compares the voxels with the initialised prototypes (by the trainer's own assignment rule)."""
    trainer = in_process_trainer(workspace, monkeypatch, name)
    assert (trainer.core_network.classifier.balance is not None) == ("balancedSlots" in name)
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    sampler_calls = []
    original_add = trainer.embedding_sampler.add
    monkeypatch.setattr(trainer.embedding_sampler, "add", lambda *a: (
        sampler_calls.append((trainer.current_epoch, trainer.network.training)), original_add(*a)))
    classifier = trainer.core_network.classifier
    assert trainer.warmup_epochs == 1
    trainer.current_epoch = 0
    trainer.on_train_epoch_start()
    trainer.train_step(next(trainer.dataloader_train))
    assert sampler_calls == [] and not bool(classifier.initialized.any())
    trainer.current_epoch = trainer.warmup_epochs
    trainer.on_train_epoch_start()
    assert sampler_calls == [(1, False)] * trainer.prototype_init_batches
    assert bool(classifier.initialized.all()) and trainer.network.training
    seen = {}
    original = classifier.ema_update

    def spy(features, labels, valid, assigned, correct, extra_mask=None, tally=None):
        seen["expected"] = classifier.assignments(features, labels, valid)
        seen["given"] = (assigned, correct)
        return original(features, labels, valid, assigned, correct, extra_mask, tally)
    monkeypatch.setattr(classifier, "ema_update", spy)
    initialised = classifier.prototypes.clone()
    trainer.train_step(next(trainer.dataloader_train))
    assert all(torch.equal(given, expected) for given, expected in zip(seen["given"], seen["expected"]))
    assert not torch.equal(classifier.prototypes, initialised)


def test_inference_mode_scores_mper_prototype_inference_from_the_same_weights(workspace):
    """``inference-mode``: a sibling run with the same checkpoint and another inference mode, predicted and scored as
    nnU-Net's final validation; in linear mode it reproduces the source's own validation exactly."""
    from nnunetv2_proto.evaluation.inference_modes import derived_trainer_name
    env, source = workspace["env"], "nnUNetTrainerMPER_testBudget"
    assert derived_trainer_name("nnUNetTrainerMPER_cpuBudgetLong_seed3", "prototype") == \
        "nnUNetTrainerMPER_cpuBudgetLong_protoInference_seed3"
    cli = [command("nnunetv2-proto"), "inference-mode", "-d", DATASET_ID, "-c", CONFIGURATION, "-f", "0"]
    for mode in ("linear", "prototype"):
        run(cli + ["-tr", source, "--mode", mode], env)
    linear = output_folder(env, derived_trainer_name(source, "linear"))
    prototype = output_folder(env, derived_trainer_name(source, "prototype"))
    original = output_folder(env, source)
    for folder in (linear, prototype):
        assert (folder / "checkpoint_final.pth").resolve() == (original / "checkpoint_final.pth").resolve()
        summary = json.loads((folder / "validation" / "summary.json").read_text())
        assert len(summary["metric_per_case"]) == len(workspace["val_cases"])
    spec = json.loads((prototype.parent / "plans.json").read_text())["configurations"][CONFIGURATION]["prototype_head"]
    assert spec["config"]["inference"] == "prototype"
    read = lambda path: sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # noqa: E731
    for case in workspace["val_cases"]:
        assert np.array_equal(read(linear / "validation" / f"{case}.nii.gz"),
                              read(original / "validation" / f"{case}.nii.gz"))
    # existing results are not overwritten silently; a model without an MPER head is refused
    again = run(cli + ["-tr", source, "--mode", "prototype"], env, expect=2)
    assert "--replace" in again.stderr + again.stdout
    vanilla = run(cli + ["-tr", "nnUNetTrainer_testBudget", "--mode", "prototype"], env, expect=2)
    assert "not trained by an MPER trainer" in vanilla.stderr + vanilla.stdout


def test_mper_from_vanilla_starts_from_the_finished_vanilla_model(workspace, monkeypatch):
    """Every weight of the vanilla checkpoint, its final 1x1 conv included, and prototypes from its features
    before the first step; through nnUNetv2_train too."""
    trainer = in_process_trainer(workspace, monkeypatch, "nnUNetTrainerMPER_fromVanilla_testBudget", fold=0)
    vanilla = torch.load(output_folder(workspace["env"], "nnUNetTrainer_testBudget") / "checkpoint_final.pth",
                         weights_only=False)["network_weights"]
    trainer.load_source_model()
    ours = trainer.core_network.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in vanilla.items())
    assert any(".seg_layers." in k for k in vanilla) and trainer.warmup_epochs == 0
    env = workspace["env"]
    name = "nnUNetTrainerMPER_fromVanilla_testBudget"
    run([command("nnUNetv2_train"), DATASET_ID, CONFIGURATION, "0", "-tr", name, "-device", "cpu"], env,
        {"PROTO_TEST_STOP_AFTER_EPOCH": "0"}, expect=75)
    folder = output_folder(env, name)
    log = sorted(folder.glob("training_log_*.txt"))[-1].read_text()
    assert "network initialised from" in log and "prototypes initialised by k-means for classes [0, 1, 2, 3] (epoch 0)" in log
    assert json.loads((folder / "source_model.json").read_text())["source_trainer"] == "nnUNetTrainer_testBudget"


def test_a_missing_or_leaking_source_model_is_refused_with_the_fix(workspace, monkeypatch):
    from nnunetv2_proto.environment import SetupError
    missing = in_process_trainer(workspace, monkeypatch, "nnUNetTrainerMPER_fromVanilla_testBudget", fold=4)
    with pytest.raises(SetupError, match="train it first: nnUNetv2_train .* -tr nnUNetTrainer_testBudget"):
        missing.load_source_model()
    leaking = in_process_trainer(workspace, monkeypatch, "nnUNetTrainerBCP_fromAllLabels_testBudget", fold=0)
    with pytest.raises(SetupError, match="leak"):
        leaking.load_source_model()


def test_self_training_steps_hold_the_labelled_voxels_of_a_labelled_only_step(workspace, monkeypatch):
    """Labelled-signal parity: every labelled patch of the batch is in the step whole (pasted both ways), in
    two passes of the plans' batch size."""
    trainer = in_process_trainer(workspace, monkeypatch, "nnUNetTrainerBCP_testBudget")
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.current_epoch = trainer.warmup_epochs
    trainer.on_train_epoch_start()
    batch = next(trainer.dataloader_train)
    images, voxels = trainer.training_inputs(batch)
    patch_voxels = int(np.prod(trainer.configuration_manager.patch_size))
    assert images.shape[0] == 2 * trainer.batch_size and trainer.micro_batch_count(images) == 2
    from_labelled = voxels.weights == 1.0
    assert int(from_labelled.sum()) == trainer.batch_size * patch_voxels
    assert torch.equal(~from_labelled, voxels.from_unlabeled)
    result = trainer.train_step(batch)
    assert np.isfinite(result["loss"])


def test_semi_supervised_logs_teacher_student_and_confidence_every_self_training_epoch(workspace):
    for trainer, prototypes in (("nnUNetTrainerBCP_testBudget", False), ("nnUNetTrainerMPERSemi_testBudget", True)):
        log = "\n".join(p.read_text() for p in output_folder(workspace["env"], trainer).glob("training_log_*.txt"))
        dice = [line for line in log.splitlines() if "self-training Dice on validation patches: teacher" in line]
        confident = [line for line in log.splitlines() if "of unlabelled voxels above teacher confidence" in line]
        assert len(dice) == 2 and len(confident) == 2  # epochs 1 and 2 self-train
        if prototypes:
            assert len([line for line in log.splitlines() if "of them from pseudo labels" in line]) == 2
