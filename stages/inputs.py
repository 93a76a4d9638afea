"""inputs: a digest of the datasets the sweep and the testbed read -> data/inputs.json.

DVC cannot list the datasets a sweep uses as its dependencies (they come from params), so this small stage
depends on all of data/ and on the `datasets` and `mixtures` params, and writes a digest of only the datasets in
use: their params, prepared data and features. The sweep and the testbed depend on the digest. Adding an
unrelated dataset reruns this stage in seconds and leaves the digest, and so the sweep, unchanged.

Feature caches are not read byte by byte (the paper's are 70 GB): a cache is a deterministic function of its
identity (encoder weights, views, storage dtype), its sample list and its shape, which its meta.json records,
so the digest of a cache is the digest of that file (plus the size of its features).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from dynaprompt.plan import expand_plan

from .common import settings, write_json


def folder_digest(folder: Path) -> str | None:
    """sha256 over every file's relative path and content; None when the folder is missing."""
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def features_digest(folder: Path) -> str | None:
    """sha256 over each cache's meta.json and the size of its features file; None when the folder is missing."""
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for meta in sorted(folder.glob("*/meta.json")):
        features = meta.with_name("features.npy")
        digest.update(str(meta.parent.name).encode() + b"\0" + meta.read_bytes())
        digest.update(str(features.stat().st_size if features.is_file() else -1).encode())
    return digest.hexdigest()


def streams_in_use(config) -> list[str]:
    """Every dataset or mixture a planned run or the testbed reads."""
    return list(dict.fromkeys([key.dataset for key, _ in expand_plan(config)] + list(config.testbed.streams)))


def datasets_in_use(config, streams: list[str]) -> list[str]:
    """The datasets behind `streams`, mixtures resolved to their members."""
    names = []
    for stream in streams:
        names.extend(config.mixtures[stream].members if stream in config.mixtures else [stream])
    return list(dict.fromkeys(names))


def main() -> None:
    config = settings()
    streams = streams_in_use(config)
    used = datasets_in_use(config, streams)
    digest = {name: {"params": config.raw["datasets"][name],
                     "prepared": folder_digest(config.path("prepared") / name),
                     "features": features_digest(config.path("features") / name)} for name in used}
    digest["mixtures"] = {name: config.raw["mixtures"][name] for name in streams
                          if name in config.mixtures}
    write_json(config.base_dir / "data" / "inputs.json", digest)
    print(f"inputs: {len(used)} datasets in use: {', '.join(used)}")


if __name__ == "__main__":
    main()
