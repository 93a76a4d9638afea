"""Datasets as manifests: one row per test sample (sample_id, label, class_name, path)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MANIFEST_COLUMNS = ["sample_id", "label", "class_name", "path"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's root folder or files are missing."""


class ImageFolderDataset:
    """`root/<class_name>/<image>`; classes in sorted folder order; sample ids are the relative paths."""

    def __init__(self, name: str, root: str | Path, fine_grained: bool = False):
        self.name = name
        self.root = Path(root)
        self.fine_grained = fine_grained
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"dataset {name!r}: root folder {self.root} does not exist")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        if not class_dirs:
            raise DatasetNotFoundError(f"dataset {name!r}: no class folders under {self.root}")
        self.classnames = [d.name for d in class_dirs]
        rows = [
            {"sample_id": f"{d.name}/{f.name}", "label": label, "class_name": d.name, "path": str(f)}
            for label, d in enumerate(class_dirs)
            for f in sorted(d.iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        self.manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        self._paths = dict(zip(self.manifest["sample_id"], self.manifest["path"]))

    def load(self, sample_id: str) -> Image.Image:
        """The image of one sample, as RGB."""
        path = self._paths[sample_id]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as error:
            raise OSError(f"dataset {self.name!r}, sample {sample_id!r}: cannot read {path}: {error}") from error


DATASET_KINDS = {"image_folder": ImageFolderDataset}


def build_dataset(name: str, spec: dict, base_dir: Path = Path(".")):
    """A dataset from its params entry, e.g. {kind: image_folder, root: data/demo}."""
    options = dict(spec)
    kind = options.pop("kind", "image_folder")
    if kind not in DATASET_KINDS:
        raise ValueError(f"dataset {name!r}: kind {kind!r} is not one of {sorted(DATASET_KINDS)}")
    if "root" in options:
        options["root"] = base_dir / Path(options["root"]).expanduser()
    return DATASET_KINDS[kind](name, **options)
