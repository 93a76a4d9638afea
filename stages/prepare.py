"""prepare@<dataset>: the dataset's adapter -> data/prepared/<dataset>/ (manifest.parquet, classnames, pixels)."""
from __future__ import annotations

import sys
import time

from dynaprompt.datasets import DatasetNotFoundError, build_dataset, write_prepared

from .common import PARAMS_FILE, dataset_spec, fail, path


def main(name: str) -> None:
    start = time.perf_counter()
    try:
        dataset = build_dataset(name, dataset_spec(name), base_dir=PARAMS_FILE.resolve().parent)
    except (DatasetNotFoundError, ValueError) as error:
        fail(str(error))
    out = path("prepared") / name
    write_prepared(dataset, out)
    print(f"prepared {name}: {len(dataset)} samples, {len(dataset.classnames)} classes -> {out} "
          f"({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main(sys.argv[1])
