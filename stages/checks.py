"""great-expectations suites: run a list of expectations on a table, report each failure by column and rows."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image

MAX_LISTED = 20  # rows named per failed expectation in a report


def _context():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    return gx, context


def run_suite(frame: pd.DataFrame, expectations: list, suite_name: str, id_column: str | None = "sample_id") -> dict:
    """Validate `frame`; the report lists every failed expectation with its column, values and row ids."""
    gx, context = _context()
    batch = (
        context.data_sources.add_pandas(suite_name)
        .add_dataframe_asset(name="table")
        .add_batch_definition_whole_dataframe("whole")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
    for expectation in expectations:
        suite.add_expectation(expectation)
    result_format = {"result_format": "COMPLETE"}
    if id_column and id_column in frame.columns:
        result_format["unexpected_index_column_names"] = [id_column]
    outcome = batch.validate(suite, result_format=result_format)
    failures = [_describe(r, id_column) for r in outcome.results if not r.success]
    return {"suite": suite_name, "success": bool(outcome.success), "rows": len(frame),
            "evaluated": len(outcome.results), "failures": failures}


def _describe(result, id_column) -> dict:
    """One failed expectation, in words a person can act on."""
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "result_format")}
    details = result.result or {}
    failure = {"expectation": config.type, "column": kwargs.pop("column", None), "kwargs": _plain(kwargs)}
    if "unexpected_count" in details:
        failure["unexpected_count"] = int(details["unexpected_count"])
        failure["unexpected_values"] = _plain(list(details.get("partial_unexpected_list", []))[:MAX_LISTED])
    ids = details.get("unexpected_index_list") or []
    if ids and isinstance(ids[0], dict) and id_column:
        failure["sample_ids"] = [str(row.get(id_column)) for row in ids[:MAX_LISTED]]
    if "observed_value" in details:
        failure["observed_value"] = _plain(details["observed_value"])
    return failure


def _plain(value):
    """JSON-friendly copies of numpy scalars and containers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def summarize_failures(report: dict) -> str:
    """One line per failed expectation."""
    lines = []
    for failure in report["failures"]:
        where = f"column {failure['column']!r}" if failure["column"] else "table"
        what = failure.get("sample_ids") or failure.get("unexpected_values") or failure.get("observed_value")
        count = failure.get("unexpected_count")
        lines.append(f"{failure['expectation']} failed on {where}"
                     + (f" ({count} rows)" if count is not None else "") + f": {what}")
    return "\n".join(lines)


def image_error(path: str) -> str:
    """'' if the file exists and decodes fully, else why not."""
    if not os.path.isfile(path):
        return f"missing file: {path}"
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # noqa: BLE001 -- any decoder failure is a bad file
        return f"undecodable: {path}: {error}"
    return ""


def file_errors(manifest: pd.DataFrame, pixels=None, threads: int = 8) -> list[str]:
    """Per row: '' when its image can be read (file decodes, or array index in range), else the reason."""
    if pixels is not None:
        n = len(pixels)
        shape_ok = pixels.ndim == 4 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8
        return ["" if (shape_ok and 0 <= int(i) < n) else f"index {i} outside pixel array of shape {pixels.shape}"
                for i in manifest["index"]]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(image_error, manifest["path"].astype(str)))


def manifest_expectations(n_classes: int, expected_rows: int | None = None) -> list:
    """The suite every dataset manifest must pass."""
    import great_expectations.expectations as gxe

    expectations = [
        gxe.ExpectColumnValuesToBeUnique(column="sample_id"),
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("sample_id", "label", "class_name")],
        gxe.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=n_classes - 1),
        gxe.ExpectColumnValuesToMatchRegex(column="class_name", regex=r"\S"),
        gxe.ExpectColumnValuesToBeInSet(column="file_error", value_set=[""]),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    if expected_rows is not None:
        expectations.append(gxe.ExpectTableRowCountToEqual(value=expected_rows))
    return expectations
