"""Orderings: a named rule mapping a dataset's manifest to the sequence of sample ids a method sees."""
from __future__ import annotations

import numpy as np
import pandas as pd


def natural(manifest: pd.DataFrame) -> list[str]:
    """The manifest's own order."""
    return manifest["sample_id"].tolist()


def shuffle(manifest: pd.DataFrame, seed: int = 0) -> list[str]:
    """A uniformly random permutation, fixed by `seed`."""
    order = np.random.default_rng(seed).permutation(len(manifest))
    return manifest["sample_id"].iloc[order].tolist()


def class_blocked(manifest: pd.DataFrame, seed: int = 0) -> list[str]:
    """All samples of a class together; class order and order within a class drawn from `seed`."""
    rng = np.random.default_rng(seed)
    labels = manifest["label"].to_numpy()
    stream = []
    for label in rng.permutation(np.unique(labels)):
        members = manifest["sample_id"].to_numpy()[labels == label]
        stream.extend(members[rng.permutation(len(members))].tolist())
    return stream


def cyclic(manifest: pd.DataFrame, block: int = 100, seed: int = 0) -> list[str]:
    """Domains in turn, `block` samples each, recurring until every domain is used up.

    Needs a `domain` column (a mixture of datasets sharing a label space). Domains keep their order of first
    appearance; samples within a domain are shuffled by `seed`. With domains A, B, C: A B C A B C ...
    """
    if "domain" not in manifest.columns:
        raise ValueError("the cyclic ordering needs a dataset with a `domain` column (a mixture of datasets)")
    rng = np.random.default_rng(seed)
    queues = []
    for domain in pd.unique(manifest["domain"]):
        members = manifest["sample_id"].to_numpy()[manifest["domain"].to_numpy() == domain]
        queues.append(list(members[rng.permutation(len(members))]))
    stream = []
    while any(queues):
        for queue in queues:
            stream.extend(queue[:block])
            del queue[:block]
    return stream


ORDERING_KINDS = {"natural": natural, "shuffle": shuffle, "class_blocked": class_blocked, "cyclic": cyclic}


def order_samples(manifest: pd.DataFrame, spec) -> list[str]:
    """Apply an ordering given as data: an OrderingSpec, or a mapping such as {kind: shuffle, seed: 1}."""
    options = dict(spec.as_dict() if hasattr(spec, "as_dict") else spec)
    kind = options.pop("kind", None)
    if kind not in ORDERING_KINDS:
        raise ValueError(f"ordering kind {kind!r} is not one of {sorted(ORDERING_KINDS)}")
    try:
        return ORDERING_KINDS[kind](manifest, **options)
    except TypeError as error:
        raise ValueError(f"ordering {spec!r}: {error}") from error
