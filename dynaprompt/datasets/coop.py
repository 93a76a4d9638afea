"""The ten fine-grained sets in CoOp's layout: the test split of CoOp's split files, which carry class names."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .base import ManifestDataset, manifest_from_rows, require_dir, require_file


@dataclass(frozen=True)
class CoopLayout:
    """Where a set keeps its images and its split file, relative to the dataset's root."""

    image_dir: str
    split_file: str


COOP_LAYOUTS = {
    "caltech101": CoopLayout("101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": CoopLayout("images", "split_zhou_OxfordPets.json"),
    "stanford_cars": CoopLayout("", "split_zhou_StanfordCars.json"),
    "flowers102": CoopLayout("jpg", "split_zhou_OxfordFlowers.json"),
    "food101": CoopLayout("images", "split_zhou_Food101.json"),
    "sun397": CoopLayout("SUN397", "split_zhou_SUN397.json"),
    "dtd": CoopLayout("images", "split_zhou_DescribableTextures.json"),
    "eurosat": CoopLayout("2750", "split_zhou_EuroSAT.json"),
    "ucf101": CoopLayout("UCF-101-midframes", "split_zhou_UCF101.json"),
}


def coop_split(name: str, root, kind: str, image_dir: str | None = None, split_file: str | None = None,
               split: str = "test") -> ManifestDataset:
    """Samples of one split of a CoOp split file: entries `[image path, label, class name]`."""
    layout = COOP_LAYOUTS[kind]
    root = require_dir(name, Path(root))
    images = root / (layout.image_dir if image_dir is None else image_dir)
    split_path = require_file(name, root / (split_file or layout.split_file), "split file")
    splits = json.loads(split_path.read_text())
    if split not in splits:
        raise ValueError(f"dataset {name!r}: split {split!r} not in {split_path} (has {sorted(splits)})")
    names: dict[int, str] = {}
    for entries in splits.values():
        for _, label, classname in entries:
            names.setdefault(int(label), classname)
    classnames = [names.get(i, f"class {i}") for i in range(max(names) + 1)]
    rows = [
        {"sample_id": path, "label": int(label), "class_name": classname, "path": str(images / path)}
        for path, label, classname in splits[split]
    ]
    return ManifestDataset(name, classnames, manifest_from_rows(rows))


def fgvc_aircraft(name: str, root, split: str = "test") -> ManifestDataset:
    """FGVC-Aircraft's own layout (`root` = its `data/` folder): variants.txt and images_variant_<split>.txt."""
    root = require_dir(name, Path(root))
    variants_file = require_file(name, root / "variants.txt", "class list")
    classnames = [line.strip() for line in variants_file.read_text().splitlines() if line.strip()]
    label_of = {classname: i for i, classname in enumerate(classnames)}
    listing = require_file(name, root / f"images_variant_{split}.txt", "split list")
    rows = []
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        image_id, variant = line.strip().split(" ", 1)
        if variant not in label_of:
            raise ValueError(f"dataset {name!r}: {listing} names variant {variant!r}, absent from {variants_file}")
        rows.append({"sample_id": f"{image_id}.jpg", "label": label_of[variant], "class_name": variant,
                     "path": str(root / "images" / f"{image_id}.jpg")})
    return ManifestDataset(name, classnames, manifest_from_rows(rows))
