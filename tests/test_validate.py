"""The validate stage's great-expectations suite names each bad row."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dynaprompt.config import settings_from_params
from dynaprompt.datasets import build_dataset, write_prepared
from dynaprompt.specs import DatasetSpec
from stages.validate import validate


def spec(**pipeline_keys) -> DatasetSpec:
    return DatasetSpec("pets", "image_folder", {}, **pipeline_keys)


@pytest.fixture
def prepared(tmp_path):
    """A prepared image-folder dataset: 2 classes x 3 images, all fine."""
    root = tmp_path / "raw"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * k, dtype=np.uint8)).save(root / name / f"{k}.png")
    dataset = build_dataset("pets", "image_folder", {"root": str(root)})
    folder = tmp_path / "prepared" / "pets"
    write_prepared(dataset, folder)
    return folder


def edit_manifest(folder, change):
    manifest = pd.read_parquet(folder / "manifest.parquet")
    manifest = change(manifest)
    manifest.to_parquet(folder / "manifest.parquet", index=False)
    return manifest


def failures_by_type(report):
    return {f["expectation"]: f for f in report["failures"]}


def test_clean_dataset_passes(prepared):
    report = validate("pets", spec(), prepared)
    assert report["success"], report


def test_missing_file_is_named(prepared):
    manifest = pd.read_parquet(prepared / "manifest.parquet")
    (prepared.parent.parent / "raw" / manifest["sample_id"][1]).unlink()
    failure = failures_by_type(validate("pets", spec(), prepared))["expect_column_values_to_be_in_set"]
    assert failure["column"] == "file_error" and failure["sample_ids"] == [manifest["sample_id"][1]]
    assert "missing file" in failure["unexpected_values"][0]


def test_truncated_image_is_named(prepared):
    manifest = pd.read_parquet(prepared / "manifest.parquet")
    path = prepared.parent.parent / "raw" / manifest["sample_id"][4]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    failure = failures_by_type(validate("pets", spec(), prepared))["expect_column_values_to_be_in_set"]
    assert failure["sample_ids"] == [manifest["sample_id"][4]]
    assert "undecodable" in failure["unexpected_values"][0]


def test_label_out_of_range_is_named(prepared):
    def bad_label(manifest):
        manifest.loc[2, "label"] = 7
        return manifest

    manifest = edit_manifest(prepared, bad_label)
    failure = failures_by_type(validate("pets", spec(), prepared))["expect_column_values_to_be_between"]
    assert failure["column"] == "label" and failure["unexpected_values"] == [7]
    assert failure["sample_ids"] == [manifest["sample_id"][2]]


def test_duplicate_sample_id_is_named(prepared):
    def duplicate(manifest):
        manifest.loc[3, "sample_id"] = manifest.loc[0, "sample_id"]
        return manifest

    manifest = edit_manifest(prepared, duplicate)
    failure = failures_by_type(validate("pets", spec(), prepared))["expect_column_values_to_be_unique"]
    assert failure["column"] == "sample_id"
    assert failure["unexpected_values"] == [manifest["sample_id"][0]] * 2


def test_empty_class_name_and_wrong_count_are_named(prepared):
    def blank(manifest):
        manifest.loc[5, "class_name"] = "  "
        return manifest

    edit_manifest(prepared, blank)
    failures = failures_by_type(validate("pets", spec(expected_samples=10), prepared))
    assert failures["expect_column_values_to_match_regex"]["column"] == "class_name"
    assert failures["expect_table_row_count_to_equal"]["observed_value"] == 6


def test_stage_exits_nonzero_with_the_report(prepared, tmp_path, monkeypatch, capsys):
    import stages.validate as stage

    edit_manifest(prepared, lambda m: m.assign(label=m["label"].where(m.index != 0, -1)))
    params = {"datasets": {"pets": {"kind": "image_folder", "root": "raw"}},
              "paths": {"prepared": str(prepared.parent), "validation": str(tmp_path / "v")}}
    monkeypatch.setattr(stage, "settings", lambda: settings_from_params(params))
    with pytest.raises(SystemExit) as exit_info:
        stage.main("pets")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "failed validation" in err and "label" in err
    assert (tmp_path / "v" / "pets.json").is_file()
