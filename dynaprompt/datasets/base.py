"""A dataset is a manifest -- one row per test sample: sample_id, label, class_name, and path or index."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MANIFEST_COLUMNS = ["sample_id", "label", "class_name", "path"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's root folder or one of its index files is missing."""


def require_dir(dataset: str, path: Path, what: str = "root folder") -> Path:
    """`path` if it is a folder, else one clear error naming the dataset and the path."""
    if not path.is_dir():
        raise DatasetNotFoundError(f"dataset {dataset!r}: {what} {path} does not exist")
    return path


def require_file(dataset: str, path: Path, what: str) -> Path:
    """`path` if it is a file, else one clear error naming the dataset and the path."""
    if not path.is_file():
        raise DatasetNotFoundError(f"dataset {dataset!r}: {what} {path} does not exist")
    return path


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ManifestDataset:
    """Samples listed in a manifest; images read from `path`, or from `pixels[index]` for array datasets."""

    def __init__(self, name: str, classnames: list[str], manifest: pd.DataFrame, pixels: np.ndarray | None = None):
        self.name = name
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.manifest = manifest.reset_index(drop=True)
        self.pixels = pixels
        self._row = {sample_id: i for i, sample_id in enumerate(self.manifest["sample_id"])}

    def __len__(self) -> int:
        return len(self.manifest)

    def load(self, sample_id: str):
        """The image of one sample: a PIL image, or a uint8 array for array datasets."""
        row = self.manifest.iloc[self._row[sample_id]]
        if self.pixels is not None:
            return self.pixels[int(row["index"])]
        try:
            with Image.open(row["path"]) as image:
                return image.convert("RGB")
        except OSError as error:
            raise OSError(f"dataset {self.name!r}, sample {sample_id!r}: cannot read {row['path']}: {error}") from error


def manifest_from_rows(rows: list[dict]) -> pd.DataFrame:
    """A manifest with the standard columns, whatever extra columns the rows carry."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=MANIFEST_COLUMNS)
    return frame


def folder_per_class(name: str, root: Path, class_dirs: list[Path], labels: list[int],
                     classnames: list[str]) -> ManifestDataset:
    """Samples from `class_dirs[i]/<image>` with label `labels[i]`; sample ids are paths relative to `root`."""
    rows = [
        {"sample_id": str(f.relative_to(root)), "label": label, "class_name": classnames[label], "path": str(f)}
        for folder, label in zip(class_dirs, labels)
        for f in image_files(folder)
    ]
    return ManifestDataset(name, classnames, manifest_from_rows(rows))


def image_folder(name: str, root) -> ManifestDataset:
    """`root/<class name>/<image>`; classes in sorted folder order."""
    root = require_dir(name, Path(root))
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise DatasetNotFoundError(f"dataset {name!r}: no class folders under {root}")
    classnames = [d.name for d in class_dirs]
    return folder_per_class(name, root, class_dirs, list(range(len(class_dirs))), classnames)


def write_prepared(dataset: ManifestDataset, folder: Path) -> None:
    """Write a dataset as the prepare stage's output: manifest.parquet, classnames.txt (+ pixels.npy)."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset.manifest.to_parquet(folder / "manifest.parquet", index=False)
    (folder / "classnames.txt").write_text("\n".join(dataset.classnames) + "\n")
    (folder / "meta.json").write_text(json.dumps({"name": dataset.name}))
    if dataset.pixels is not None:
        np.save(folder / "pixels.npy", np.asarray(dataset.pixels))


def load_prepared(name: str, folder) -> ManifestDataset:
    """A dataset from the prepare stage's output folder."""
    folder = require_dir(name, Path(folder), "prepared folder (run `dvc repro` or the prepare stage)")
    manifest = pd.read_parquet(require_file(name, folder / "manifest.parquet", "manifest"))
    classnames = require_file(name, folder / "classnames.txt", "class list").read_text().splitlines()
    pixels_file = folder / "pixels.npy"
    pixels = np.load(pixels_file, mmap_mode="r") if pixels_file.is_file() else None
    return ManifestDataset(name, classnames, manifest, pixels=pixels)


class MixtureDataset(ManifestDataset):
    """Several datasets sharing a label space as one, with a `domain` column; sample ids are `member/sample_id`."""

    def __init__(self, name: str, members: dict[str, ManifestDataset], per_member: int | None = None, seed: int = 0):
        first = next(iter(members.values()))
        for member_name, member in members.items():
            if member.classnames != first.classnames:
                raise ValueError(f"mixture {name!r}: {member_name!r} does not share the label space of the others")
        frames = []
        for member_name, member in members.items():
            frame = member.manifest[["sample_id", "label", "class_name"]].copy()
            if per_member is not None and per_member < len(frame):
                keep = np.sort(np.random.default_rng(seed).permutation(len(frame))[:per_member])
                frame = frame.iloc[keep]
            frame["member_sample_id"] = frame["sample_id"]
            frame["sample_id"] = member_name + "/" + frame["sample_id"].astype(str)
            frame["domain"] = member_name
            frames.append(frame)
        super().__init__(name, first.classnames, pd.concat(frames, ignore_index=True))
        self.members = members

    def load(self, sample_id: str):
        member, member_sample_id = split_mixture_id(sample_id)
        return self.members[member].load(member_sample_id)


def split_mixture_id(sample_id: str) -> tuple[str, str]:
    """`member/sample_id` -> (member, sample_id); member names contain no slash."""
    member, _, rest = sample_id.partition("/")
    return member, rest
