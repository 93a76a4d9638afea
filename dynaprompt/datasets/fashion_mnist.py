"""The bundled default: Fashion-MNIST at 32x32 RGB, with ImageNet-C style corrupted test streams."""
from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .base import ManifestDataset, require_dir, require_file

DEBIAN_PATH = "/usr/share/datasets/fashion-mnist"
CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """An array from an idx file (gzipped or not), as Fashion-MNIST and MNIST ship them."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        _, dtype_code, n_dims = struct.unpack(">HBB", handle.read(4))
        if dtype_code != 0x08:
            raise ValueError(f"{path}: only unsigned-byte idx files are supported")
        shape = struct.unpack(f">{n_dims}I", handle.read(4 * n_dims))
        data = np.frombuffer(handle.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header promises {shape}, file holds {data.size} bytes (truncated?)")
    return data.reshape(shape)


def load_split(source: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale images [N, 28, 28] and labels [N] of the train or test split."""
    source = require_dir("fashion_mnist", Path(source), "source folder (apt-get install dataset-fashion-mnist)")
    image_file, label_file = FILES[split]
    images = read_idx(require_file("fashion_mnist", source / image_file, "image file"))
    labels = read_idx(require_file("fashion_mnist", source / label_file, "label file"))
    if len(images) != len(labels):
        raise ValueError(f"fashion_mnist {split}: {len(images)} images but {len(labels)} labels in {source}")
    return images, labels.astype(np.int64)


def to_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """Grayscale [N, H, W] -> RGB [N, size, size, 3] uint8, bilinear upsampling."""
    tensor = torch.from_numpy(np.array(images)).unsqueeze(1)
    resized = TF.resize(tensor, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return resized.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()


def stratified_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of `n` samples with the classes as balanced as the data allows, sorted; all when n is None."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    picked, round_index = [], 0
    while len(picked) < n:
        for members in per_class:
            if round_index < len(members) and len(picked) < n:
                picked.append(members[round_index])
        round_index += 1
    return np.sort(np.asarray(picked))


def corruption_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """A 32-bit seed per (stream, sample): streams are reproducible and independent."""
    digest = hashlib.sha256(f"{seed}:{corruption}:{severity}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def corrupt_images(images: np.ndarray, indices: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """ImageNet-C style corruption of RGB uint8 images; image i's noise depends only on (seed, stream, index)."""
    from corrupt_tta import corrupt  # pipeline dependency: only needed to prepare the default streams

    out = np.empty_like(images)
    state = np.random.get_state()  # corrupt_tta draws from numpy's global RNG: restore it afterwards
    try:
        for k, (image, index) in enumerate(zip(images, indices)):
            np.random.seed(corruption_seed(seed, corruption, severity, int(index)))
            corrupted = corrupt(image, severity=severity, corruption_name=corruption)
            out[k] = np.clip(np.rint(corrupted), 0, 255).astype(np.uint8)
    finally:
        np.random.set_state(state)
    return out


def prepare_stream(source, split: str = "test", corruption: str | None = None, severity: int = 3,
                   image_size: int = 32, n_samples: int | None = None, seed: int = 0):
    """Pixels [N, S, S, 3] and a manifest of one (optionally corrupted) stream of Fashion-MNIST."""
    images, labels = load_split(source, split)
    chosen = stratified_subset(labels, n_samples, seed)
    pixels = to_rgb(images[chosen], image_size)
    if corruption:
        pixels = corrupt_images(pixels, chosen, corruption, severity, seed)
    manifest = pd.DataFrame({
        "sample_id": [f"{split}-{i:05d}" for i in chosen],
        "label": labels[chosen],
        "class_name": [CLASSNAMES[c] for c in labels[chosen]],
        "index": np.arange(len(chosen)),
    })
    return pixels, manifest


def fashion_mnist(name: str, source: str = DEBIAN_PATH, split: str = "test", corruption: str | None = None,
                  severity: int = 3, image_size: int = 32, n_samples: int | None = None, seed: int = 0):
    """One Fashion-MNIST stream, prepared in memory (the prepare stage writes it to disk once)."""
    pixels, manifest = prepare_stream(source, split, corruption, severity, image_size, n_samples, seed)
    return ManifestDataset(name, CLASSNAMES, manifest, pixels=pixels)
