"""The ImageNet family in its usual layouts; class names are CLIP's curated ImageNet names.

The WordNet ids of ImageNet-1k (and of the 200-class subsets of ImageNet-A and -R) come from the lists
timm ships, a dependency of open_clip, so no file has to be fetched.
"""
from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from .base import DatasetNotFoundError, ManifestDataset, folder_per_class, require_dir


@cache
def synsets(subset: str = "imagenet") -> list[str]:
    """WordNet ids of ImageNet-1k ('imagenet') or of the 'imagenet_a' / 'imagenet_r' subsets, in label order."""
    text = resources.files("timm.data").joinpath("_info", f"{subset}_synsets.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _wnid_folders(name: str, root: Path, wnids: list[str]) -> list[Path]:
    """The class folder of every wnid; a missing one is an error naming it."""
    folders = [root / wnid for wnid in wnids]
    missing = [f.name for f in folders if not f.is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset {name!r}: {len(missing)} class folder(s) missing under {root}, e.g. {missing[:3]}"
        )
    return folders


def imagenet(name: str, root) -> ManifestDataset:
    """ImageNet val arranged as `root/<wnid>/*.JPEG` (1000 folders)."""
    root = require_dir(name, Path(root))
    wnids = synsets("imagenet")
    folders = _wnid_folders(name, root, wnids)
    return folder_per_class(name, root, folders, list(range(1000)), imagenet_classnames())


def subset_classnames(subset: str) -> list[str]:
    """The class names of a 200-class subset ('imagenet_a', 'imagenet_r'), in label order."""
    all_wnids = {wnid: i for i, wnid in enumerate(synsets("imagenet"))}
    names = imagenet_classnames()
    return [names[all_wnids[w]] for w in synsets(subset)]


def _subset(name: str, root, subset: str) -> ManifestDataset:
    """A 200-class subset: labels index the subset, names are the 1000-class names of those wnids."""
    root = require_dir(name, Path(root))
    wnids = synsets(subset)
    classnames = subset_classnames(subset)
    folders = _wnid_folders(name, root, wnids)
    return folder_per_class(name, root, folders, list(range(len(wnids))), classnames)


def imagenet_a(name: str, root) -> ManifestDataset:
    """ImageNet-A: `root/<wnid>/*.jpg`, 200 classes."""
    return _subset(name, root, "imagenet_a")


def imagenet_r(name: str, root) -> ManifestDataset:
    """ImageNet-R: `root/<wnid>/*.jpg`, 200 classes."""
    return _subset(name, root, "imagenet_r")


def imagenet_sketch(name: str, root) -> ManifestDataset:
    """ImageNet-Sketch: `root/<wnid>/*.JPEG` (the `sketch/` folder of the release), 1000 classes."""
    return imagenet(name, root)


def imagenet_v2(name: str, root) -> ManifestDataset:
    """ImageNet-V2: folders named 0..999 are the class indices (sorting them as strings would scramble labels)."""
    root = require_dir(name, Path(root))
    folders = [root / str(i) for i in range(1000)]
    missing = [f.name for f in folders if not f.is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset {name!r}: {len(missing)} class folder(s) missing under {root}, e.g. {missing[:3]}"
        )
    return folder_per_class(name, root, folders, list(range(1000)), imagenet_classnames())


def imagenet_classnames() -> list[str]:
    """CLIP's 1000 ImageNet class names, from open_clip (imported here: the other adapters do not need it)."""
    from open_clip import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)
