"""Where nnU-Net's folders and this plugin's trainers are, and errors that say how to fix them."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
from pathlib import Path
from typing import Dict, Optional

NNUNET_FOLDER_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
TRAINER_PATH_VARIABLE = "nnUNet_extTrainer"


class SetupError(RuntimeError):
    """A problem with the user's input or environment: states the problem and the fix."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}\n  Fix: {fix}")
        self.problem = problem
        self.fix = fix

    def __reduce__(self):
        # rebuilt from both arguments: an error raised in a multiprocessing worker reaches the parent intact
        # (the default pickling passes only the message, the pool's result thread dies and the parent hangs)
        return type(self), (self.problem, self.fix)


def trainer_directory() -> Path:
    """The folder that holds this plugin's trainer modules (the value for nnUNet_extTrainer).

    In an editable install this is the repository's ``trainers/`` folder, in a regular
    install ``site-packages/nnunetv2_proto/trainers``; both are found through the import
    system so that the answer is right for whichever copy Python would import.
    """
    spec = importlib.util.find_spec("nnunetv2_proto.trainers")
    if spec is None or not spec.submodule_search_locations:
        raise SetupError(
            "the package nnunetv2_proto.trainers cannot be imported, so nnU-Net cannot find the trainers",
            "reinstall the plugin: pip install -e . (from the repository) or pip install nnunetv2-proto",
        )
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def find_trainer_class(trainer_name: str) -> type:
    """Resolve a trainer exactly as nnUNetv2_train / nnUNetv2_predict do (nnU-Net's package, then
    nnUNet_extTrainer), without their search printout; nnU-Net's RuntimeError if there is none."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    with contextlib.redirect_stdout(io.StringIO()):
        return recursive_find_trainer_class_by_name(trainer_name)


def trainer_path_is_exported(directory: Optional[Path] = None) -> bool:
    directory = trainer_directory() if directory is None else directory
    listed = os.environ.get(TRAINER_PATH_VARIABLE, "")
    return any(entry.strip() and Path(entry).resolve() == directory for entry in listed.split(os.pathsep))


def require_trainer_path_exported() -> None:
    if not trainer_path_is_exported():
        raise SetupError(
            f"{TRAINER_PATH_VARIABLE} does not list this plugin's trainer folder ({trainer_directory()}), "
            "so nnUNetv2_train / nnUNetv2_predict cannot find the prototype trainers",
            f"export {TRAINER_PATH_VARIABLE}=$(nnunetv2-proto trainer-path)",
        )


def require_nnunet_folders(names: tuple = NNUNET_FOLDER_VARIABLES) -> Dict[str, Path]:
    """The nnU-Net folders named by ``names``; a SetupError for each one that is unset."""
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        exports = " ".join(f"{name}=/path/to/{name}" for name in missing)
        raise SetupError(
            f"nnU-Net's folder variable(s) {', '.join(missing)} are not set",
            f"export {exports} (see nnU-Net's documentation/setting_up_paths.md)",
        )
    return {name: Path(os.environ[name]) for name in names}


def dataset_folders(root: Path) -> Dict[int, Path]:
    """Dataset id -> folder for every ``DatasetXXX_Name`` folder directly under ``root``."""
    found: Dict[int, Path] = {}
    if root.is_dir():
        for child in sorted(root.iterdir()):
            match = re.fullmatch(r"Dataset(\d{3})_.+", child.name)
            if match and child.is_dir():
                found[int(match.group(1))] = child
    return found


def resolve_dataset_name(dataset: str) -> str:
    """``501`` or ``Dataset501_LeftAtrium`` -> the dataset's folder name, by nnU-Net's own lookup (which looks
    in nnUNet_raw, nnUNet_preprocessed and nnUNet_results, and refuses an id that two datasets share)."""
    if not dataset.isdigit() and not re.fullmatch(r"Dataset\d{3}_.+", dataset):
        raise SetupError(
            f"'{dataset}' is neither a dataset id nor a DatasetXXX_Name folder name",
            "pass the numeric id (e.g. -d 501) or the full name (e.g. -d Dataset501_LeftAtrium)",
        )
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return str(maybe_convert_to_dataset_name(dataset))
    except RuntimeError as error:
        conflict = str(error).startswith("More than one")
        searched = ", ".join(f"{v}={os.environ.get(v, '<unset>')}" for v in NNUNET_FOLDER_VARIABLES)
        raise SetupError(
            (f"more than one dataset has the id {int(dataset)}" if conflict else
             f"no dataset with id {int(dataset)} exists") + f" ({searched})",
            "rename or remove the duplicate so each id names one dataset, or pass the full DatasetXXX_Name"
            if conflict else "check the id with `ls $nnUNet_raw $nnUNet_preprocessed`, or create the dataset first",
        ) from None
