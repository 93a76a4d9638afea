"""prepare@<dataset>: the dataset's adapter -> data/prepared/<dataset>/ (manifest.parquet, classnames, pixels)."""
from __future__ import annotations

import sys
import time

from dynaprompt.datasets import DatasetNotFoundError, build_dataset, write_prepared

from .common import fail, settings


def main(name: str) -> None:
    start, config = time.perf_counter(), settings()
    spec = config.datasets.get(name) or fail(f"dataset {name!r} is not defined in params")
    try:
        dataset = build_dataset(name, spec.kind, spec.options, base_dir=config.base_dir)
    except (DatasetNotFoundError, ValueError) as error:
        fail(str(error))
    out = config.path("prepared") / name
    write_prepared(dataset, out)
    print(f"prepared {name}: {len(dataset)} samples, {len(dataset.classnames)} classes -> {out} "
          f"({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main(sys.argv[1])
