"""MPER's prototype slots over a run: which (class, prototype) slots the EMA update feeds, epoch by epoch.

The update is winner-take-all (a voxel moves only its nearest own-class prototype, and only when the
prototype classifier is right), so a slot that loses its voxels stays where k-means put it and a class
can end up served by one prototype. nnUNetTrainerMPER prints one line per prototype epoch into nnU-Net's
training log (``format_slot_line``); ``read_slot_history`` reads those lines back from a fold folder
(every ``training_log_*.txt`` of the run, resumed runs included; an archived run keeps its logs), and
``plot_slot_shares`` draws each class's share per slot against the epoch, so a stale or collapsed
prototype can be seen, and compared across seeds.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

SLOT_LINE_PREFIX = "MPER prototypes: voxels that moved each (class, prototype) slot "
_EPOCH_LINE = re.compile(r": Epoch (\d+)\s*$")
_SLOT_LINE = re.compile(re.escape(SLOT_LINE_PREFIX) + r"(\[\[.*?\]\])(?:; of them from pseudo labels (\[\[.*?\]\]))?"
                        r"; cosine distance moved (\[\[.*?\]\]);")
_LOG_NAME = re.compile(r"training_log_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)\.txt$")


def format_slot_line(counts: Sequence[Sequence[int]], moved: Sequence[Sequence[float]],
                     pseudo_counts: Optional[Sequence[Sequence[int]]] = None) -> str:
    """The training-log line of one epoch: ``counts`` / ``pseudo_counts`` (K, M) voxels that updated each slot
    (all of them / those with pseudo labels), ``moved`` (K, M) the cosine distance each prototype moved."""
    counts = [[int(c) for c in row] for row in counts]
    stale = sum(c == 0 for row in counts for c in row)
    pseudo = (f"; of them from pseudo labels {[[int(c) for c in row] for row in pseudo_counts]}"
              if pseudo_counts is not None else "")
    return (f"{SLOT_LINE_PREFIX}{counts}{pseudo}; "
            f"cosine distance moved {[[round(float(d), 4) for d in row] for row in moved]}; "
            f"{stale} slot(s) not updated this epoch")


@dataclass(frozen=True)
class SlotHistory:
    epochs: np.ndarray  # (E,) the prototype epochs, ascending
    counts: np.ndarray  # (E, K, M) voxels that updated each slot in that epoch
    moved: np.ndarray  # (E, K, M) cosine distance each prototype moved in that epoch

    @property
    def shares(self) -> np.ndarray:
        """(E, K, M) each slot's share of its class's updating voxels (0 where the class had none)."""
        totals = self.counts.sum(-1, keepdims=True)
        return np.divide(self.counts, totals, out=np.zeros(self.counts.shape), where=totals > 0)

    def empty_since(self) -> np.ndarray:
        """(K, M) the first epoch from which the slot received no voxel until the end of the run, -1 if it did
        in the last epoch."""
        fed = self.counts > 0
        # index of the last epoch that fed each slot, -1 for a slot never fed
        last_fed = np.where(fed.any(0), fed.shape[0] - 1 - np.argmax(fed[::-1], axis=0), -1)
        first_empty = self.epochs[np.minimum(last_fed + 1, fed.shape[0] - 1)]
        return np.where(fed[-1], -1, first_empty)


def _log_order(path: Path) -> tuple:
    match = _LOG_NAME.search(path.name)
    return tuple(int(g) for g in match.groups()) if match else (0,) * 6


def read_slot_history(fold_folder: Path) -> Optional[SlotHistory]:
    """The slot lines of every training log in ``fold_folder``, oldest log first; a later log's line for an epoch
    replaces an earlier one (``--c`` repeats the epochs after the last checkpoint). None if there are none."""
    by_epoch: Dict[int, tuple] = {}
    for log in sorted(Path(fold_folder).glob("training_log_*.txt"), key=_log_order):
        epoch = None
        for line in log.read_text(errors="replace").splitlines():
            epoch_match = _EPOCH_LINE.search(line)
            if epoch_match:
                epoch = int(epoch_match.group(1))
                continue
            slot_match = _SLOT_LINE.search(line)
            if slot_match and epoch is not None:
                by_epoch[epoch] = (ast.literal_eval(slot_match.group(1)), ast.literal_eval(slot_match.group(3)))
    if not by_epoch:
        return None
    epochs = sorted(by_epoch)
    return SlotHistory(np.array(epochs), np.array([by_epoch[e][0] for e in epochs], dtype=np.int64),
                       np.array([by_epoch[e][1] for e in epochs], dtype=float))


def slot_table(histories: Dict[str, SlotHistory], class_names: Sequence[str]) -> List[str]:
    """Markdown: per run and class, the slot shares in the first and last prototype epoch and the empty slots."""
    lines = ["| run | class | shares, first prototype epoch | shares, last epoch | empty at the end (since epoch) |",
             "|---|---|---|---|---|"]
    for run, history in histories.items():
        since, shares = history.empty_since(), history.shares
        for k, name in enumerate(class_names):
            first = " / ".join(f"{s:.2f}" for s in shares[0, k])
            last = " / ".join(f"{s:.2f}" for s in shares[-1, k])
            empty = [f"{m + 1} ({since[k, m]})" for m in range(since.shape[1]) if since[k, m] >= 0]
            lines.append(f"| {run} | {name} | {first} (epoch {history.epochs[0]}) | {last} (epoch {history.epochs[-1]}) "
                         f"| {', '.join(empty) if empty else 'none'} |")
    return lines


def plot_slot_shares(histories: Dict[str, SlotHistory], class_names: Sequence[str], path: Path) -> Path:
    """One row per run, one column per class: each slot's share of the class's updating voxels per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, columns = len(histories), len(class_names)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.0 * rows + 0.4), squeeze=False,
                             sharex=True, sharey=True)
    for row, (run, history) in enumerate(histories.items()):
        shares = history.shares
        for k, name in enumerate(class_names):
            ax = axes[row, k]
            ax.stackplot(history.epochs, shares[:, k].T, labels=[f"prototype {m + 1}" for m in range(shares.shape[2])],
                         alpha=0.85)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(name, fontsize=9)
            if k == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(run, 22)), fontsize=7)
            if row == rows - 1:
                ax.set_xlabel("epoch", fontsize=8)
    axes[0, -1].legend(fontsize=6, loc="upper right")
    fig.suptitle("MPER: share of each class's updating voxels per prototype slot (a band at 0 is a stale slot)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
