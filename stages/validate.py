"""validate@<dataset>: a great-expectations suite on the prepared manifest; a failure stops `dvc repro`.

The report (reports/validation/<dataset>.json) names each failed expectation, its column and sample ids.
"""
from __future__ import annotations

import sys

from dynaprompt.datasets import EXPECTED, load_prepared

from .checks import file_errors, manifest_expectations, run_suite, summarize_failures
from .common import fail, settings, write_json


def expected_rows(spec) -> int | None:
    """How many samples the dataset must have, where that is known."""
    if spec.kind == "fashion_mnist":
        return spec.options.get("n_samples")
    if spec.kind in EXPECTED and spec.options.get("split", "test") == "test":
        return EXPECTED[spec.kind][0]
    return spec.expected_samples


def validate(name: str, spec, prepared_folder) -> dict:
    """The validation report of one prepared dataset."""
    dataset = load_prepared(name, prepared_folder)
    table = dataset.manifest.copy()
    table["file_error"] = file_errors(table, dataset.pixels)
    report = run_suite(table, manifest_expectations(len(dataset.classnames), expected_rows(spec)), f"manifest-{name}")
    report["dataset"] = name
    return report


def main(name: str) -> None:
    config = settings()
    report = validate(name, config.datasets[name], config.path("prepared") / name)
    target = config.path("validation") / f"{name}.json"
    write_json(target, report)
    if not report["success"]:
        fail(f"dataset {name!r} failed validation (report: {target}):\n{summarize_failures(report)}")
    print(f"validated {name}: {report['rows']} rows, {report['evaluated']} expectations passed -> {target}")


if __name__ == "__main__":
    main(sys.argv[1])
