"""Adapters for the paper's 15 datasets and the bundled default, on tiny fake trees made here."""
import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from dynaprompt.datasets import ADAPTERS, DatasetNotFoundError, build_dataset, load_prepared, write_prepared
from dynaprompt.datasets.coop import COOP_LAYOUTS
from dynaprompt.datasets.fashion_mnist import CLASSNAMES, prepare_stream, read_idx
from dynaprompt.datasets.imagenet import synsets


def save_image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_wnid_tree(root, wnids, with_images=(0, 5)):
    for i, wnid in enumerate(wnids):
        (root / wnid).mkdir(parents=True)
        if i in with_images:
            save_image(root / wnid / f"{wnid}_1.JPEG", i)


def test_imagenet_labels_follow_the_synset_order(tmp_path):
    make_wnid_tree(tmp_path, synsets("imagenet"), with_images=(0, 999))
    dataset = build_dataset("in", "imagenet", {"root": str(tmp_path)})
    assert len(dataset.classnames) == 1000 and dataset.classnames[0] == "tench"
    assert dataset.manifest["label"].tolist() == [0, 999]
    assert dataset.manifest["class_name"].tolist() == ["tench", "toilet paper"]


@pytest.mark.parametrize("kind", ["imagenet_a", "imagenet_r"])
def test_200_class_subsets_use_subset_labels_and_imagenet_names(tmp_path, kind):
    wnids = synsets(kind)
    make_wnid_tree(tmp_path, wnids, with_images=(0, 199))
    dataset = build_dataset(kind, kind, {"root": str(tmp_path)})
    assert len(dataset.classnames) == 200
    assert dataset.manifest["label"].tolist() == [0, 199]
    all_wnids = synsets("imagenet")
    from open_clip import IMAGENET_CLASSNAMES
    assert dataset.classnames[0] == IMAGENET_CLASSNAMES[all_wnids.index(wnids[0])]


def test_imagenet_v2_folder_names_are_class_indices_not_string_order(tmp_path):
    for i in range(1000):
        (tmp_path / str(i)).mkdir()
    save_image(tmp_path / "10" / "a.jpeg")
    save_image(tmp_path / "2" / "b.jpeg")
    dataset = build_dataset("v2", "imagenet_v2", {"root": str(tmp_path)})
    labels = dict(zip(dataset.manifest["sample_id"], dataset.manifest["label"]))
    assert labels == {"10/a.jpeg": 10, "2/b.jpeg": 2}


def test_imagenet_sketch_layout(tmp_path):
    make_wnid_tree(tmp_path, synsets("imagenet"), with_images=(3,))
    dataset = build_dataset("sketch", "imagenet_sketch", {"root": str(tmp_path)})
    assert dataset.manifest["label"].tolist() == [3]


def test_missing_class_folder_is_named(tmp_path):
    make_wnid_tree(tmp_path, synsets("imagenet_a")[1:])
    with pytest.raises(DatasetNotFoundError, match=synsets("imagenet_a")[0]):
        build_dataset("a", "imagenet_a", {"root": str(tmp_path)})


@pytest.mark.parametrize("kind", sorted(COOP_LAYOUTS))
def test_coop_split_files_give_test_samples_and_class_names(tmp_path, kind):
    layout = COOP_LAYOUTS[kind]
    images = tmp_path / layout.image_dir
    entries = {"train": [["cls_a/t.jpg", 0, "class a"]],
               "test": [["cls_b/x.jpg", 1, "class_b"], ["cls_a/y.jpg", 0, "class a"]]}
    for split in entries.values():
        for relative, _, _ in split:
            save_image(images / relative)
    (tmp_path / layout.split_file).write_text(json.dumps(entries))
    dataset = build_dataset(kind, kind, {"root": str(tmp_path)})
    assert dataset.classnames == ["class a", "class b"]
    assert dataset.manifest["sample_id"].tolist() == ["cls_b/x.jpg", "cls_a/y.jpg"]
    assert dataset.manifest["label"].tolist() == [1, 0]
    assert dataset.load("cls_b/x.jpg").size == (8, 8)


def test_fgvc_aircraft_variant_lists(tmp_path):
    (tmp_path / "variants.txt").write_text("707-320\nA300B4\nF-16A/B\n")
    (tmp_path / "images_variant_test.txt").write_text("0001 F-16A/B\n0002 707-320\n")
    for image_id in ("0001", "0002"):
        save_image(tmp_path / "images" / f"{image_id}.jpg")
    dataset = build_dataset("air", "fgvc_aircraft", {"root": str(tmp_path)})
    assert dataset.classnames == ["707-320", "A300B4", "F-16A/B"]
    assert dataset.manifest["label"].tolist() == [2, 0]


@pytest.mark.parametrize("kind", sorted(set(ADAPTERS) - {"fashion_mnist"}))
def test_missing_root_gives_one_clear_error(tmp_path, kind):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as error:
        build_dataset("my_set", kind, {"root": str(missing)})
    assert "my_set" in str(error.value) and str(missing) in str(error.value)


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(40, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(40) % 10)
    return tmp_path


def test_fashion_mnist_streams_are_deterministic_and_corrupted(fake_fmnist):
    clean, manifest = prepare_stream(fake_fmnist, n_samples=20, seed=0)
    noisy, same_manifest = prepare_stream(fake_fmnist, corruption="gaussian_noise", severity=3, n_samples=20, seed=0)
    again, _ = prepare_stream(fake_fmnist, corruption="gaussian_noise", severity=3, n_samples=20, seed=0)
    assert clean.shape == (20, 32, 32, 3) and clean.dtype == np.uint8
    assert manifest.equals(same_manifest)
    assert np.bincount(manifest["label"]).tolist() == [2] * 10  # stratified
    assert np.array_equal(noisy, again) and not np.array_equal(noisy, clean)
    assert set(manifest["class_name"]) == set(CLASSNAMES)


def test_truncated_idx_file_is_named(tmp_path):
    path = tmp_path / "bad-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((4, 28, 28)))
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    with gzip.open(path, "wb") as handle:
        handle.write(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_prepared_round_trip(fake_fmnist, tmp_path):
    options = {"source": str(fake_fmnist), "n_samples": 10, "corruption": "pixelate", "severity": 5}
    dataset = build_dataset("fm", "fashion_mnist", options)
    write_prepared(dataset, tmp_path / "prepared" / "fm")
    loaded = load_prepared("fm", tmp_path / "prepared" / "fm")
    assert loaded.classnames == dataset.classnames
    assert loaded.manifest.equals(dataset.manifest)
    sample = dataset.manifest["sample_id"][3]
    assert np.array_equal(loaded.load(sample), dataset.load(sample))
