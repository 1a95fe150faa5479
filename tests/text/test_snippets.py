import numpy as np
import pytest

from fidelity.core.errors import FidelityError
from fidelity.text.snippets import load_snippets, split_snippets


@pytest.fixture(scope="module")
def snippets():
    return load_snippets()


def test_the_vendored_file_has_every_rated_sentence_but_the_zeros(snippets):
    assert len(snippets) == 10605 - 37
    assert not np.any(snippets.ratings == 0)
    np.testing.assert_array_equal(snippets.labels, (snippets.ratings > 0).astype(int))
    assert len(set(snippets.ids.tolist())) == len(snippets)
    assert all(isinstance(text, str) and text for text in snippets.texts)


def test_split_is_stratified_disjoint_and_seeded(snippets):
    train, test = split_snippets(snippets, seed=0)
    assert len(train) + len(test) == len(snippets)
    assert not set(train.ids.tolist()) & set(test.ids.tolist())
    assert abs(train.labels.mean() - test.labels.mean()) < 0.01
    again, _ = split_snippets(snippets, seed=0)
    np.testing.assert_array_equal(train.ids, again.ids)
    other, _ = split_snippets(snippets, seed=1)
    assert not np.array_equal(train.ids, other.ids)


def test_size_subsamples_the_training_side_of_the_same_split(snippets):
    full_train, full_test = split_snippets(snippets, seed=0)
    small_train, small_test = split_snippets(snippets, seed=0, size=300, test_size=50)
    assert (len(small_train), len(small_test)) == (300, 50)
    assert set(small_train.ids.tolist()) <= set(full_train.ids.tolist())
    assert set(small_test.ids.tolist()) <= set(full_test.ids.tolist())
    assert abs(small_train.labels.mean() - full_train.labels.mean()) < 0.01


@pytest.mark.parametrize("size", [0, 3, 10**6, 2.5, True])
def test_bad_sizes_are_rejected(snippets, size):
    with pytest.raises(FidelityError, match="size"):
        split_snippets(snippets, size=size)
