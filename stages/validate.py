"""validate@<dataset>: a great-expectations suite on the prepared manifest; a failure stops `dvc repro`.

The report (reports/validation/<dataset>.json) names each failed expectation, its column and sample ids.
"""
from __future__ import annotations

import sys

from dynaprompt.datasets import EXPECTED, expected_samples, load_prepared

from .checks import file_errors, manifest_expectations, run_suite, summarize_failures
from .common import fail, settings, write_json


def validate(name: str, spec, prepared_folder, settings=None) -> dict:
    """The validation report of one prepared dataset."""
    dataset = load_prepared(name, prepared_folder)
    table = dataset.manifest.copy()
    table["file_error"] = file_errors(table, dataset.pixels)
    expected = expected_samples(spec, settings)
    report = run_suite(table, manifest_expectations(len(dataset.classnames), expected), f"manifest-{name}")
    report["dataset"] = name
    report["split_size_checked"] = expected is not None
    report["split_size_relaxed"] = bool(settings is not None and not settings.validate.known_split_sizes
                                        and spec.kind in EXPECTED)
    return report


def main(name: str) -> None:
    config = settings()
    report = validate(name, config.datasets[name], config.path("prepared") / name, config)
    target = config.path("validation") / f"{name}.json"
    write_json(target, report)
    if not report["success"]:
        fail(f"dataset {name!r} failed validation (report: {target}):\n{summarize_failures(report)}")
    print(f"validated {name}: {report['rows']} rows, {report['evaluated']} expectations passed -> {target}")


if __name__ == "__main__":
    main(sys.argv[1])
