"""Orderings: a named rule mapping a dataset's manifest to the sequence of sample ids a method sees.

Kinds (each a function below; its keyword arguments are the options params may set):
    natural        the manifest's own order
    shuffle        i.i.d.: a uniformly random permutation
    class_blocked  one class after another ("separate" in StatA)
    cyclic         the domains of a mixture taking turns in blocks that recur
    dirichlet      NOTE's class-correlated stream: classes spread over chunks by Dirichlet(delta) proportions
    hardest_first  by zero-shot entropy, highest first, decile by decile (needs a `difficulty` column)
    easiest_first  its mirror, lowest entropy first
"""
from __future__ import annotations

import numpy as np
import pandas as pd

NOTE_MIN_CHUNK = 10  # NOTE learner/dnn.py, target_data_processing: min_size_thresh = 10 samples per chunk
MAX_DIRICHLET_DRAWS = 1000  # ours: NOTE redraws without a bound; at 1000 failed draws the stream is named
DIFFICULTY = "difficulty"  # the manifest column hardest_first / easiest_first order by (dynaprompt.difficulty)


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


# ---------------------------------------------------------------- NOTE's Dirichlet stream


def dirichlet(manifest: pd.DataFrame, delta: float = 0.1, seed: int = 0, min_chunk: int = NOTE_MIN_CHUNK
              ) -> list[str]:
    """NOTE's temporally correlated stream (Gong et al., NeurIPS 2022), concentration `delta`.

    Read from TaesikGong/NOTE at a714a2a2a9406903ba787b0bc240a95dd0342de5, learner/dnn.py,
    `DNN.target_data_processing`, branch `tgt_train_dist == 4` (their default, `--dirichlet_beta 0.1`):

    1. C chunks, C the number of classes. For each class k in label order: shuffle its samples, draw
       proportions ~ Dirichlet(delta, ..., delta) over the chunks, zero those of chunks already holding N/C
       samples or more (`len(idx_j) < N / C`), renormalise, and cut the shuffled samples at
       `int(cumsum(p) * n_k)`. Redraw everything (every class again) until every chunk holds `min_chunk`
       samples (NOTE's `min_size_thresh = 10`; `min_chunk: 0` keeps the first draw).
    2. Each chunk in turn: its classes in a shuffled order, each class's share contiguous.

    Where this differs from NOTE's code, and why:
    - Random numbers: `np.random.default_rng(seed)` instead of NumPy's global RandomState, in NOTE's order
      (per draw: for each class a shuffle, then a Dirichlet; then one class-order shuffle per chunk); the same
      seed therefore gives another stream than NOTE's, from the same distribution.
    - C counts the classes present in the manifest (NOTE: the dataset's class count; its test sets hold every
      class, and a class with no sample would only add a chunk that cannot be filled).
    - When the float draw underflows to zero on every chunk still open (it happens at delta 0.001), NOTE
      divides 0 by 0 and its NaN cut points put the whole class in the last chunk, full or not (on x86). Here
      the class's proportions are drawn again from Dirichlet(delta) over the open chunks only: by the
      Dirichlet's aggregation property, that is the distribution NOTE's masked, renormalised draw has.
    - The stream is a permutation of the whole manifest: NOTE's trim to `nsample` and its drop of the samples
      left over after the last update batch (`update_every_x`) are not applied.
    - NOTE redraws forever; here at most MAX_DIRICHLET_DRAWS draws, then a ValueError naming N, C and delta.
      NOTE's minimum is met only near its own delta 0.1: at 0.01 and below a class rarely lands whole in one
      chunk and the draws almost never fill every chunk unless the classes are of equal size (simulated: 0 of
      50 draws at 0.01 on 200 classes of 8-120 samples; 3% on 10 classes of 30). `min_chunk: 0` keeps the
      first draw there (as StatA's sampler, which has no minimum, always does).
    """
    chunks = dirichlet_chunks(manifest["label"].to_numpy(), delta, seed, min_chunk)
    return manifest["sample_id"].to_numpy()[np.concatenate(chunks)].tolist()


def dirichlet_chunks(labels: np.ndarray, delta: float, seed: int, min_chunk: int = NOTE_MIN_CHUNK
                     ) -> list[np.ndarray]:
    """The stream of `dirichlet` as C chunks of row positions, in stream order (see `dirichlet`)."""
    classes, n = np.unique(labels), len(labels)
    if not delta > 0:
        raise ValueError(f"dirichlet: delta (the concentration) must be > 0, got {delta!r}")
    if n < min_chunk * len(classes):
        raise ValueError(f"dirichlet: {n} samples cannot fill {len(classes)} chunks (one per class) of at least "
                         f"{min_chunk} samples each (delta {delta:g})")
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_DRAWS):
        per_chunk = split_classes(labels, classes, delta, rng)
        if min(sum(len(part) for part in chunk.values()) for chunk in per_chunk) >= min_chunk:
            break
    else:
        c = len(classes)
        raise ValueError(f"dirichlet: no draw in {MAX_DIRICHLET_DRAWS} gave every one of the {c} chunks {min_chunk} "
                         f"samples (N = {n} samples, C = {c} classes: N/C = {n / c:.3g} a chunk; delta {delta:g}); "
                         "use a longer stream, a larger delta or min_chunk: 0")
    stream = []
    for chunk in per_chunk:
        class_order = np.arange(len(classes))
        rng.shuffle(class_order)
        stream.append(np.concatenate([chunk[k] for k in class_order if k in chunk] or [np.zeros(0, dtype=int)]))
    return stream


def split_classes(labels: np.ndarray, classes: np.ndarray, delta: float, rng: np.random.Generator) -> list:
    """One draw of NOTE's split: chunk j -> {class position k: row positions of class k in chunk j} (non-empty
    shares only)."""
    n_chunks, n = len(classes), len(labels)
    per_chunk = [{} for _ in range(n_chunks)]
    sizes = np.zeros(n_chunks, dtype=int)
    for k, label in enumerate(classes):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        proportions = rng.dirichlet(np.repeat(delta, n_chunks))
        open_chunks = sizes < n / n_chunks  # NOTE's balance: a chunk holding N/C samples gets no more
        proportions = proportions * open_chunks
        if proportions.sum() == 0:  # underflow on every open chunk (see `dirichlet`)
            proportions[open_chunks] = rng.dirichlet(np.repeat(delta, open_chunks.sum()))
        proportions = proportions / proportions.sum()
        cuts = (np.cumsum(proportions) * len(members)).astype(int)[:-1]
        bounds = np.concatenate(([0], cuts, [len(members)]))  # chunk j gets members[bounds[j]:bounds[j + 1]]
        shares = np.diff(bounds)
        for j in np.flatnonzero(shares):
            per_chunk[j][k] = members[bounds[j]:bounds[j + 1]]
        sizes += shares
    return per_chunk


# ---------------------------------------------------------------- by zero-shot difficulty


def hardest_first(manifest: pd.DataFrame, seed: int = 0, bins: int = 10) -> list[str]:
    """Highest zero-shot entropy first: the `bins` rank bins (deciles) of `easiest_first`, hardest bin first,
    the order within each bin drawn from `seed`."""
    return by_difficulty(manifest, "hardest_first", seed, bins, hardest=True)


def easiest_first(manifest: pd.DataFrame, seed: int = 0, bins: int = 10) -> list[str]:
    """Lowest zero-shot entropy first: samples ranked by the `difficulty` column (ties in manifest order) and
    cut into `bins` bins of equal count (the first ones one larger where N is not a multiple), easiest bin
    first, the order within each bin drawn from `seed`."""
    return by_difficulty(manifest, "easiest_first", seed, bins, hardest=False)


def by_difficulty(manifest: pd.DataFrame, kind: str, seed: int, bins: int, hardest: bool) -> list[str]:
    if DIFFICULTY not in manifest.columns:
        raise ValueError(f"the {kind} ordering needs a `{DIFFICULTY}` column in the manifest (the zero-shot "
                         "entropy of each sample, dynaprompt.difficulty.with_difficulty)")
    difficulty = manifest[DIFFICULTY].to_numpy(dtype=float)
    if np.isnan(difficulty).any():
        missing = manifest["sample_id"].iloc[int(np.flatnonzero(np.isnan(difficulty))[0])]
        raise ValueError(f"the {kind} ordering: sample {missing!r} has no `{DIFFICULTY}` value")
    ranked = np.argsort(difficulty, kind="stable")  # easiest first, ties in manifest order
    groups = np.array_split(ranked, bins)
    rng = np.random.default_rng(seed)
    stream = [group[rng.permutation(len(group))] for group in (groups[::-1] if hardest else groups)]
    return manifest["sample_id"].to_numpy()[np.concatenate(stream)].tolist()


# ---------------------------------------------------------------- the kinds as data


ORDERING_KINDS = {"natural": natural, "shuffle": shuffle, "class_blocked": class_blocked, "cyclic": cyclic,
                  "dirichlet": dirichlet, "hardest_first": hardest_first, "easiest_first": easiest_first}
DIFFICULTY_KINDS = ("hardest_first", "easiest_first")  # kinds whose manifest needs the `difficulty` column


def needs_difficulty(kind: str) -> bool:
    return kind in DIFFICULTY_KINDS


def option_problem(kind: str, option: str, value) -> str | None:
    """Why `value` is not a valid `option` of ordering `kind`, or None (checked as params load)."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if option == "delta":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        return None if ok else f"{kind}: delta (the Dirichlet concentration) must be a number > 0, got {value!r}"
    if option == "seed" and not (is_int and value >= 0):
        return f"{kind}: seed must be an integer >= 0, got {value!r}"
    if option in ("block", "bins") and not (is_int and value >= 1):
        return f"{kind}: {option} must be an integer >= 1, got {value!r}"
    if option == "min_chunk" and not (is_int and value >= 0):
        return f"{kind}: min_chunk must be an integer >= 0 (0: no minimum, a single draw), got {value!r}"
    return None


def label_correlation(labels) -> float:
    """The fraction of consecutive pairs with the same label (NaN for fewer than two samples).

    i.i.d. over C balanced classes gives about 1/C; one class after another gives (N - C) / (N - 1).
    """
    labels = np.asarray(labels)
    if len(labels) < 2:
        return float("nan")
    return float(np.mean(labels[1:] == labels[:-1]))


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
