"""Which of a fold's training cases are labelled.

Either the first ``count`` cases of a seeded permutation of the (sorted) training cases, or
an explicit list read from a JSON file (ACDC's protocol counts *patients*, each with two
frames, so counts of cases do not match it; write the patients' cases into the file). The
file holds either a list (used for every fold) or ``{"<fold>": [cases]}``. Validation cases
may never be labelled training cases.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_proto.environment import SetupError

LABELED_LIST_FILE = "labeled_cases.json"


def seeded_labeled_subset(training_cases: Sequence[str], count: int, seed: int) -> List[str]:
    cases = sorted(training_cases)
    if not 1 <= count <= len(cases):
        raise SetupError(f"{count} labelled cases were requested but the fold has {len(cases)} training cases",
                         "pick a variant with fewer labelled cases, or use more training data")
    order = np.random.default_rng(seed).permutation(len(cases))
    return sorted(cases[i] for i in order[:count])


def labeled_subset_from_file(path: Path, fold, training_cases: Sequence[str]) -> List[str]:
    if not Path(path).is_file():
        raise SetupError(f"the labelled-case list {path} does not exist",
                         "write it (nnunetv2-proto make-labeled-list ...) or use a _<N>labeled variant")
    content = json.loads(Path(path).read_text())
    listed = content.get(str(fold)) if isinstance(content, dict) else content
    if not listed:
        raise SetupError(f"{path} lists no labelled cases for fold {fold}",
                         "add the fold's cases as {\"<fold>\": [...]} or give a plain list")
    outside = sorted(set(listed) - set(training_cases))
    if outside:
        raise SetupError(f"{path} lists cases that are not training cases of fold {fold}: {outside[:5]}",
                         "labelled cases must come from the fold's training split (its validation cases stay unseen)")
    return sorted(set(listed))


def split_labeled(training_cases: Sequence[str], labeled: Sequence[str]) -> Tuple[List[str], List[str]]:
    chosen = set(labeled)
    return sorted(chosen), sorted(c for c in training_cases if c not in chosen)


def grouped_labeled_subset(training_cases: Sequence[str], groups: int, pattern: str, seed: int) -> List[str]:
    """All cases of ``groups`` randomly chosen groups (e.g. patients: pattern ``patient\\d+``)."""
    by_group: Dict[str, List[str]] = {}
    for case in sorted(training_cases):
        match = re.search(pattern, case)
        if match is None:
            raise SetupError(f"case {case} does not match the group pattern '{pattern}'",
                             "pass a --group-by regular expression that every case name contains")
        by_group.setdefault(match.group(0), []).append(case)
    chosen = seeded_labeled_subset(list(by_group), groups, seed)
    return sorted(c for g in chosen for c in by_group[g])


def write_labeled_list(path: Path, per_fold: Dict[int, List[str]], note: Optional[str] = None) -> None:
    content = {str(k): v for k, v in per_fold.items()}
    if note:
        content = {"_note": note, **content}
    Path(path).write_text(json.dumps(content, indent=2))
