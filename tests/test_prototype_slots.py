from pathlib import Path

import numpy as np

from nnunetv2_proto.evaluation.prototype_slots import format_slot_line, plot_slot_shares, read_slot_history, slot_table

ARCHIVED_ACDC_MPER = (Path(__file__).resolve().parents[1] / "docs" / "results" / "runs" / "Dataset502_ACDC" /
                      "nnUNetTrainerMPER_cpuBudgetXL_seed1__nnUNetPlans__2d_cpu" / "fold_0")


def write_log(path: Path, epochs_and_counts) -> None:
    """A training log as nnU-Net and nnUNetTrainerMPER write it: an 'Epoch N' line, then the slot line."""
    lines = []
    for epoch, counts in epochs_and_counts:
        lines += [f"2026-12-06 05:22:46.656376: Epoch {epoch}", "2026-12-06 05:22:46.656481: Current learning rate: 0.01"]
        if counts is not None:
            moved = np.full(np.shape(counts), 0.25 * epoch)
            lines.append(f"2026-12-06 05:23:23.421928: {format_slot_line(counts, moved, pseudo_counts=counts)} ")
        lines.append("2026-12-06 05:23:23.421999: train_loss 0.5")
    path.write_text("\n".join(lines) + "\n")


def test_slot_lines_read_back_across_a_resumed_run(tmp_path):
    # the first log reaches epoch 3; --c goes back to the checkpoint of epoch 2 and writes a second log
    write_log(tmp_path / "training_log_2026_12_6_5_22_19.txt",
              [(0, None), (1, [[5, 5, 0], [9, 1, 0]]), (2, [[4, 6, 0], [10, 0, 0]]), (3, [[1, 1, 1], [1, 1, 1]])])
    write_log(tmp_path / "training_log_2026_12_6_10_1_2.txt",
              [(3, [[3, 7, 0], [10, 0, 0]]), (4, [[2, 8, 0], [0, 0, 10]])])
    history = read_slot_history(tmp_path)
    assert history.epochs.tolist() == [1, 2, 3, 4]
    assert history.counts[2].tolist() == [[3, 7, 0], [10, 0, 0]]  # the resumed run's epoch 3 replaces the cut one's
    assert history.moved[:, 0, 0].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert history.shares[-1].tolist() == [[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]]
    # slot (0, 2) never fed: empty since the first prototype epoch; (1, 0) last fed in epoch 3; (1, 1) in epoch 1
    assert history.empty_since().tolist() == [[-1, -1, 1], [4, 2, -1]]
    table = slot_table({"run": history}, ["background", "structure"])
    assert "| run | structure | 0.90 / 0.10 / 0.00 (epoch 1) | 0.00 / 0.00 / 1.00 (epoch 4) | 1 (4), 2 (2) |" in table
    assert plot_slot_shares({"run": history}, ["background", "structure"], tmp_path / "slots.png").stat().st_size > 0


def test_a_log_without_prototype_epochs_has_no_slot_history(tmp_path):
    write_log(tmp_path / "training_log_2026_12_6_5_22_19.txt", [(0, None), (1, None)])
    assert read_slot_history(tmp_path) is None


def test_the_archived_acdc_run_gives_back_the_counts_its_log_printed():
    """docs/benchmarks.md quotes epoch 47 of this run: one LV prototype takes 97% of the LV voxels."""
    history = read_slot_history(ARCHIVED_ACDC_MPER)
    assert history.epochs[0] == 45 and history.epochs[-1] == 149 and len(history.epochs) == 105
    epoch_47 = history.counts[history.epochs.tolist().index(47)]
    assert epoch_47.tolist() == [[1807309, 2516150, 3073631], [6204, 24443, 8742], [570, 22475, 45284],
                                 [99084, 201, 2092]]
    assert history.shares[2, 3, 0] > 0.97
