"""An nnU-Net dataset view that reads images and never labels.

Used for the unlabelled cases: ``load_case`` opens only the image file and the properties,
returns an all-background segmentation and replaces the label-derived ``class_locations``
by None, so neither the loader's cropping nor nnU-Net's foreground oversampling can use
label information (the loader must run with oversampling off).
"""

from __future__ import annotations

from os.path import isfile, join
from typing import List

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_pickle


class ImageOnlyDataset:
    def __init__(self, folder: str, identifiers: List[str], file_format: str):
        if file_format not in ("b2nd", "npz"):
            raise ValueError(f"unknown nnU-Net dataset format {file_format}")
        self.source_folder = folder
        self.identifiers = sorted(identifiers)
        self.file_format = file_format

    def _image(self, identifier: str):
        if self.file_format == "b2nd":
            import blosc2
            return blosc2.open(urlpath=join(self.source_folder, identifier + ".b2nd"), mode="r",
                               dparams={"nthreads": 1}, mmap_mode="r")
        npy = join(self.source_folder, identifier + ".npy")
        return np.load(npy, mmap_mode="r") if isfile(npy) else np.load(join(self.source_folder, identifier + ".npz"))["data"]

    def load_case(self, identifier: str):
        data = self._image(identifier)
        properties = load_pickle(join(self.source_folder, identifier + ".pkl"))
        properties["class_locations"] = None
        seg = np.zeros((1, *data.shape[1:]), dtype=np.int8)
        return data, seg, None, properties

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)
