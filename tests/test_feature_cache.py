"""The view-feature cache: fp16 rows in one memory-mapped file, written through a DataLoader, resumable, and
the same features whichever way they are computed."""
import json
import os

import numpy as np
import pytest
import torch

from dynaprompt.datasets import build_dataset
from dynaprompt.features import FeatureStore, ImageViewSource, MappedRows, ViewEncoder, cache_identity
from dynaprompt.views import ViewConfig

VIEWS = ViewConfig(n_views=8, view_seed=0)


@pytest.fixture(scope="module")
def toy(image_root):
    return build_dataset("toy", "image_folder", {"root": str(image_root)})


def build(folder, toy, clip, workers=0, views=VIEWS, chunk_size=5, dtype="float16"):
    store = FeatureStore.for_views(folder, views)
    stats = store.build(toy, ViewEncoder(clip, views, dtype=dtype), toy.manifest["sample_id"].tolist(),
                        cache_identity(clip, "tiny-clip", views, dtype), chunk_size=chunk_size, workers=workers)
    return store, stats


def test_loader_workers_give_the_serial_features_bit_for_bit(tmp_path, toy, clip):
    serial = ImageViewSource(toy, ViewEncoder(clip, VIEWS))
    ids = toy.manifest["sample_id"].tolist()
    expected = torch.stack([serial(i) for i in ids])
    for workers in (0, 2):
        store, stats = build(tmp_path / f"w{workers}", toy, clip, workers=workers)
        assert stats == {"samples": len(ids), "reused": 0, "encoded": len(ids)}
        source = store.open("cpu", cache_identity(clip, "tiny-clip", VIEWS))
        assert torch.equal(torch.stack([source(i) for i in ids]), expected)


def test_rows_are_stored_in_half_precision_and_the_precision_is_in_the_identity(tmp_path, toy, clip):
    store, _ = build(tmp_path, toy, clip)
    array = np.load(store.features_file, mmap_mode="r")
    assert array.dtype == np.float16 and array.shape == (len(toy), VIEWS.n_views, 128)
    meta = store.read_meta()
    assert meta["identity"]["dtype"] == "float16" and meta["complete"]
    with pytest.raises(ValueError, match="was built for"):
        store.open("cpu", cache_identity(clip, "tiny-clip", VIEWS, "float32"))
    direct = ImageViewSource(toy, ViewEncoder(clip, VIEWS, dtype="float16"))  # on the fly: rounded the same way
    first = toy.manifest["sample_id"].iloc[0]
    assert torch.equal(store.open("cpu")(first), direct(first))


def test_an_interrupted_build_resumes_at_its_last_committed_chunk(tmp_path, toy, clip):
    store, _ = build(tmp_path, toy, clip)
    complete = np.array(np.load(store.features_file))
    meta = store.read_meta()
    meta["chunks_done"], meta["complete"] = [0], False  # as if killed after the first chunk of 5 samples
    store.write_meta(meta)
    array = np.load(store.features_file, mmap_mode="r+")
    array[5:] = 0
    array.flush()
    del array
    _, stats = build(tmp_path, toy, clip)
    assert stats == {"samples": 12, "reused": 5, "encoded": 7}
    assert np.array_equal(np.load(store.features_file), complete)


def test_another_identity_starts_over_without_writing_through_a_linked_file(tmp_path, toy, clip):
    store, _ = build(tmp_path, toy, clip)
    linked = tmp_path / "dvc-cache-copy.npy"
    os.link(store.features_file, linked)  # what `cache.type: hardlink` leaves in the workspace
    before = linked.read_bytes()
    meta = store.read_meta()
    meta["identity"]["weights"] = "other weights"
    store.write_meta(meta)
    build(tmp_path, toy, clip)
    assert linked.read_bytes() == before  # the rebuild unlinked and wrote a new file
    assert os.stat(linked).st_ino != os.stat(store.features_file).st_ino


def test_mapped_rows_read_one_row_at_a_time(tmp_path):
    data = np.arange(5 * 3 * 4, dtype=np.float16).reshape(5, 3, 4)
    np.save(tmp_path / "rows.npy", data)
    rows = MappedRows(tmp_path / "rows.npy")
    assert len(rows) == 5 and rows.shape == (5, 3, 4)
    for index in (3, 0, 4):
        assert torch.equal(rows[index], torch.from_numpy(data[index]))
    assert json.loads(json.dumps(rows.shape)) == [5, 3, 4]


def test_reading_every_row_keeps_the_mapped_file_out_of_resident_memory(tmp_path):
    """A run touches its rows and lets them go: RssFile stays flat over a whole pass (in a subprocess)."""
    import subprocess
    import sys

    rows = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype="float16", shape=(1000, 64, 512))
    rows[:] = 1
    rows.flush()
    del rows
    code = f"""
import numpy as np
from dynaprompt.features import MappedRows
def rss_file():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssFile"))
rows = MappedRows({str(tmp_path / "f.npy")!r})
before = rss_file()
for i in np.random.default_rng(0).permutation(1000):
    rows[int(i)]
print(rss_file() - before)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) < 8 * 1024  # KiB; the file is 64 MiB
