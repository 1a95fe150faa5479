"""Sentiment problems on the movie-review snippets with the pretrained MiniLM encoder.

``movies-minilm-logreg``: the frozen encoder's sentence embedding and a logistic-regression head
(the seed study's setup; convex, Newton-trained to the float floor).
``movies-minilm-finetune``: the encoder's last transformer block (attention + feed-forward) and
a linear head trained on the cached inputs to that block (non-convex, minibatch Adam).
"""

from __future__ import annotations

from functools import partial

import torch

from fidelity.core.cache import ArtifactCache
from fidelity.core.errors import FidelityError
from fidelity.core.problem import MinibatchRecipe, NewtonRecipe, Problem
from fidelity.problems.models import linear_model
from fidelity.text.block import BlockClassifier
from fidelity.text.encoder import block_inputs, sentence_embeddings
from fidelity.text.snippets import load_snippets, split_snippets

FINETUNE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
FINETUNE_RECIPE = MinibatchRecipe(
    optimizer="adam", learning_rate=3e-4, epochs=8, batch_size=32, momentum=0.9
)


def movies_minilm_logreg(
    seed: int = 0,
    size: int | None = None,
    test_size: int | None = None,
    device: str = "cpu",
    cache: ArtifactCache | None = None,
) -> Problem:
    """Movie-review snippets (rating > 0 is positive; ratings of 0 dropped), stratified 80/20
    split by ``seed`` (8,454 train / 2,114 test), optionally subsampled to ``size`` training and
    ``test_size`` test sentences. Features: all-MiniLM-L6-v2's sentence embedding (mean-pooled,
    L2-normalised), standardised on the train split. Binary logistic regression (bce on one
    logit) with bias, weight decay 1e-2, float64, Newton-trained."""
    train, test = split_snippets(load_snippets(), seed=seed, size=size, test_size=test_size)
    embeddings = sentence_embeddings(train.texts + test.texts, cache=cache)
    embeddings = torch.nn.functional.normalize(embeddings.double(), dim=1)
    x_train, x_test = embeddings[: len(train)], embeddings[len(train) :]
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-12)
    as_y = partial(torch.tensor, dtype=torch.float64, device=device)
    return Problem(
        name="movies-minilm-logreg",
        x_train=((x_train - mean) / std).to(device),
        y_train=as_y(train.labels.reshape(-1, 1)),
        x_test=((x_test - mean) / std).to(device),
        y_test=as_y(test.labels.reshape(-1, 1)),
        model_factory=partial(linear_model, x_train.shape[1], 1),
        loss="bce",
        weight_decay=1e-2,
        recipe=NewtonRecipe(),
        description=movies_minilm_logreg.__doc__ or "",
        train_texts=train.texts,
        test_texts=test.texts,
        featurize=partial(_standardised_embeddings, mean=mean, std=std, device=device, cache=cache),
    )


def _standardised_embeddings(
    texts: tuple[str, ...],
    *,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: str,
    cache: ArtifactCache | None,
) -> torch.Tensor:
    embeddings = sentence_embeddings(texts, cache=cache)
    embeddings = torch.nn.functional.normalize(embeddings.double(), dim=1)
    return ((embeddings - mean) / std).to(device)


def _block_features(
    texts: tuple[str, ...],
    *,
    max_length: int,
    dtype: torch.dtype,
    device: str,
    cache: ArtifactCache | None,
) -> torch.Tensor:
    inputs = block_inputs(texts, max_length=max_length, cache=cache)
    features = torch.cat([inputs.hidden, inputs.mask.unsqueeze(-1)], dim=-1)
    return features.to(device=device, dtype=dtype)


def movies_minilm_finetune(
    seed: int = 0,
    size: int = 160,
    test_size: int = 200,
    max_length: int = 32,
    dtype: str = "float32",
    device: str = "cpu",
    cache: ArtifactCache | None = None,
) -> Problem:
    """The movie-review split of ``movies-minilm-logreg``, subsampled to ``size`` training and
    ``test_size`` test sentences (stratified, by ``seed``), truncated to ``max_length`` tokens.
    Inputs: the hidden states entering MiniLM's last block (cached) with the attention mask as
    an extra channel. Model: that block (1.77M parameters, initialised from the pretrained
    weights) + mean pooling + a linear head to one logit, bce, weight decay 1e-4. Adam,
    learning rate 3e-4, batch 32, 8 epochs, seeded head initialisation and batch order. Float32
    by default: a transformer block in float64 costs 2-3x the CPU time, and the deltas measured
    here (about 1e-3) sit far above float32 rounding; ``dtype="float64"`` for conformance checks
    that compare libraries to 1e-6."""
    if dtype not in FINETUNE_DTYPES:
        raise FidelityError(
            f"movies-minilm-finetune dtype must be one of {', '.join(FINETUNE_DTYPES)}, "
            f"got {dtype!r}"
        )
    real = FINETUNE_DTYPES[dtype]
    train, test = split_snippets(load_snippets(), seed=seed, size=size, test_size=test_size)
    inputs = block_inputs(train.texts + test.texts, max_length=max_length, cache=cache)
    x = torch.cat([inputs.hidden, inputs.mask.unsqueeze(-1)], dim=-1).to(device=device, dtype=real)
    as_y = partial(torch.tensor, dtype=real, device=device)
    return Problem(
        name="movies-minilm-finetune",
        x_train=x[: len(train)].contiguous(),
        y_train=as_y(train.labels.reshape(-1, 1)),
        x_test=x[len(train) :].contiguous(),
        y_test=as_y(test.labels.reshape(-1, 1)),
        model_factory=partial(BlockClassifier, inputs.block_state),
        loss="bce",
        weight_decay=1e-4,
        recipe=FINETUNE_RECIPE,
        description=movies_minilm_finetune.__doc__ or "",
        train_texts=train.texts,
        test_texts=test.texts,
        featurize=partial(
            _block_features, max_length=max_length, dtype=real, device=device, cache=cache
        ),
    )
