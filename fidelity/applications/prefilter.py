"""Candidate prefiltering by lexical retrieval (Grosse et al. 2023's TF-IDF filtering)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.problem import TrainedProblem

METHODS = ("tfidf", "bm25")
# Every run of word characters is a term, one letter long included ("a", "I").
TOKEN_PATTERN = r"(?u)\b\w+\b"


def tfidf_similarity(queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
    """Cosine similarity of TF-IDF vectors (fitted on ``documents``), ``[queries, documents]``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True, token_pattern=TOKEN_PATTERN).fit(documents)
    return (vectorizer.transform(queries) @ vectorizer.transform(documents).T).toarray()


def bm25_similarity(
    queries: Sequence[str], documents: Sequence[str], *, k1: float = 1.5, b: float = 0.75
) -> np.ndarray:
    """Okapi BM25 scores of every document for every query, ``[queries, documents]``:
    sum over query terms of idf(t) tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avg|d|)), with
    idf(t) = log(1 + (N - df + 0.5) / (df + 0.5))."""
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(token_pattern=TOKEN_PATTERN).fit(documents)
    counts = vectorizer.transform(documents).tocsc().astype(float)  # [docs, terms]
    n_docs = counts.shape[0]
    lengths = np.asarray(counts.sum(axis=1)).ravel()
    document_frequency = np.asarray((counts > 0).sum(axis=0)).ravel()
    idf = np.log1p((n_docs - document_frequency + 0.5) / (document_frequency + 0.5))
    norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-12))
    weighted = counts.tocoo()
    values = weighted.data * (k1 + 1) / (weighted.data + norm[weighted.row]) * idf[weighted.col]
    from scipy import sparse

    term_scores = sparse.csr_matrix((values, (weighted.row, weighted.col)), shape=counts.shape)
    query_terms = (vectorizer.transform(queries) > 0).astype(float)  # each query term once
    return (query_terms @ term_scores.T).toarray()


def prefilter(
    trained: TrainedProblem,
    estimator,
    *,
    reference: str,
    test_points: Sequence[int],
    candidates: Sequence[int] = (10, 20, 50, 100, 200, 500, 1000),
    top: int = 10,
    methods: Sequence[str] = METHODS,
) -> dict[str, object]:
    """Recall of the ``top`` most influential training sentences (largest |delta_hat| under the
    fitted ``estimator``, named ``reference``) among the K training sentences a lexical
    retriever ranks most similar to the test sentence, for each K in ``candidates``: how many
    candidates an expensive influence method must score to see the influential ones. Averaged
    over ``test_points`` (indices of the test split), with the recall of K random candidates
    (K / N) for comparison."""
    problem = trained.problem
    if problem.train_texts is None or problem.test_texts is None:
        raise FidelityError(f"prefilter needs a text problem; {problem.name!r} has no texts")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise FidelityError(f"unknown retrieval method(s) {unknown}; choose from {METHODS}")
    if not 1 <= top <= problem.n_train:
        raise FidelityError(f"top must lie in [1, {problem.n_train}], got {top}")
    index = torch.as_tensor(list(test_points), dtype=torch.long)
    if len(index) == 0 or int(index.min()) < 0 or int(index.max()) >= problem.n_test:
        raise FidelityError(f"test points must be indices in [0, {problem.n_test})")
    ks = sorted({min(int(k), problem.n_train) for k in candidates})
    scores = estimator.scores(problem.test.subset(index.to(problem.device)), problem.train)
    influential = torch.topk(scores.abs().detach().cpu(), top, dim=1).indices.numpy()
    queries = [problem.test_texts[i] for i in index.tolist()]
    similarity_of = {"tfidf": tfidf_similarity, "bm25": bm25_similarity}
    recall: dict[str, dict[str, float]] = {}
    for method in methods:
        similarity = similarity_of[method](queries, problem.train_texts)
        order = np.argsort(-similarity, axis=1, kind="stable")
        recall[method] = {}
        for k in ks:
            hits = [
                len(set(order[row, :k]) & set(influential[row])) / top
                for row in range(len(queries))
            ]
            recall[method][str(k)] = float(np.mean(hits))
    recall["random"] = {str(k): k / problem.n_train for k in ks}
    return {
        "application": "prefilter",
        "problem": problem.name,
        "reference": reference,
        "top": top,
        "test_points": index.tolist(),
        "candidates": ks,
        "recall": recall,
    }
