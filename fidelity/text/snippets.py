"""The movie-review snippets (Hutto & Gilbert 2014 ratings of Pang & Lee's sentences), vendored
under ``fidelity/data/movie_snippets`` with their MIT licence.

10,605 sentences, each with the mean of about 20 human ratings on -4..4. The binary sentiment
label is ``rating > 0``; the 37 sentences rated exactly 0 are dropped (neither label fits).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources

import numpy as np

from fidelity.core.errors import FidelityError

DATA_PACKAGE = "fidelity.data.movie_snippets"
DATA_FILE = "movie_review_snippets.tsv.gz"


@dataclass(frozen=True)
class Snippets:
    """Sentences with their ids, mean human rating and binary label (1 = positive)."""

    ids: np.ndarray  # int64
    ratings: np.ndarray  # float64
    texts: tuple[str, ...]
    labels: np.ndarray  # int64, 0/1

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index: np.ndarray) -> Snippets:
        return Snippets(
            self.ids[index],
            self.ratings[index],
            tuple(self.texts[i] for i in index),
            self.labels[index],
        )


def load_snippets() -> Snippets:
    """All rated sentences except those rated exactly 0, in file order."""
    raw = resources.files(DATA_PACKAGE).joinpath(DATA_FILE).read_bytes()
    ids, ratings, texts = [], [], []
    for number, line in enumerate(gzip.decompress(raw).decode("utf-8").splitlines(), 1):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 3:
            raise FidelityError(f"{DATA_FILE} line {number}: expected 3 tab-separated fields")
        ids.append(int(fields[0]))
        ratings.append(float(fields[1]))
        texts.append(fields[2])
    ratings_array = np.asarray(ratings)
    keep = np.flatnonzero(ratings_array != 0)
    return Snippets(
        np.asarray(ids, dtype=np.int64)[keep],
        ratings_array[keep],
        tuple(texts[i] for i in keep),
        (ratings_array[keep] > 0).astype(np.int64),
    )


def split_snippets(
    snippets: Snippets,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    size: int | None = None,
    test_size: int | None = None,
) -> tuple[Snippets, Snippets]:
    """Stratified train/test split by ``seed``; ``size``/``test_size`` then subsample each side
    (stratified, by the same seed), so a small problem is a subset of the full split's sides."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise FidelityError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    everything = np.arange(len(snippets))
    train_index, test_index = train_test_split(
        everything, test_size=test_fraction, random_state=seed, stratify=snippets.labels
    )
    train_index = _subsample(train_index, snippets.labels, size, seed, "size")
    test_index = _subsample(test_index, snippets.labels, test_size, seed, "test_size")
    return snippets.take(np.sort(train_index)), snippets.take(np.sort(test_index))


def _subsample(
    index: np.ndarray, labels: np.ndarray, size: int | None, seed: int, what: str
) -> np.ndarray:
    if size is None or size == len(index):
        return index
    if isinstance(size, bool) or not isinstance(size, int) or not 4 <= size <= len(index):
        raise FidelityError(f"{what} must be an integer in [4, {len(index)}], got {size!r}")
    from sklearn.model_selection import train_test_split

    kept, _ = train_test_split(index, train_size=size, random_state=seed, stratify=labels[index])
    return kept
