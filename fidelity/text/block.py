"""The last MiniLM transformer block as a plain torch module, with a sentiment head.

Written out (rather than reusing transformers' ``BertLayer``) so that every operation is an
ordinary torch op that ``torch.func`` can vmap and differentiate forward and backward, and so
that the block's ``nn.Linear`` layers are visible to K-FAC hooks. The arithmetic is BERT's: post-
LayerNorm residual blocks, exact (erf) GELU, LayerNorm epsilon 1e-12, no dropout (training is
deterministic). ``tests/text/test_block.py`` checks it against transformers' layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional

HIDDEN = 384
HEADS = 12
INTERMEDIATE = 1536
LAYER_NORM_EPS = 1e-12

# Linear layers of the block's feed-forward part (what Grosse et al. 2023 restrict influence to).
MLP_LAYERS = ("block.intermediate", "block.output")


class MiniLMBlock(nn.Module):
    """One BERT encoder layer: self-attention + feed-forward, each with a residual and LayerNorm."""

    def __init__(
        self, hidden: int = HIDDEN, heads: int = HEADS, intermediate: int = INTERMEDIATE
    ) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = nn.Linear(intermediate, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """``hidden`` ``[n, L, d]``, ``mask`` ``[n, L]`` (1 for tokens, 0 for padding)."""
        n, length, width = hidden.shape
        head_width = width // self.heads

        def split(t: Tensor) -> Tensor:
            return t.view(n, length, self.heads, head_width).transpose(1, 2)

        q, k, v = split(self.query(hidden)), split(self.key(hidden)), split(self.value(hidden))
        logits = q @ k.transpose(-1, -2) / math.sqrt(head_width)
        # Padding keys get a large negative logit (BERT uses the dtype's minimum).
        logits = logits + (1.0 - mask)[:, None, None, :] * torch.finfo(logits.dtype).min
        context = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, width)
        attended = self.attention_norm(self.attention_output(context) + hidden)
        expanded = functional.gelu(self.intermediate(attended))
        return self.output_norm(self.output(expanded) + attended)

    def load_bert_layer(self, state: Mapping[str, Tensor]) -> MiniLMBlock:
        """Copy the weights of a transformers ``BertLayer`` state dict into this block."""
        names = {
            "query": "attention.self.query",
            "key": "attention.self.key",
            "value": "attention.self.value",
            "attention_output": "attention.output.dense",
            "attention_norm": "attention.output.LayerNorm",
            "intermediate": "intermediate.dense",
            "output": "output.dense",
            "output_norm": "output.LayerNorm",
        }
        mine = {}
        for ours, theirs in names.items():
            for field in ("weight", "bias"):
                mine[f"{ours}.{field}"] = state[f"{theirs}.{field}"]
        self.load_state_dict(mine)
        return self


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the token states over real tokens (sentence-transformers' pooling)."""
    weights = mask.unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class BlockClassifier(nn.Module):
    """Last encoder block, mean pooling and a linear head giving one logit (positive review).

    Inputs are ``[n, L, d + 1]``: the hidden states entering the block with the attention mask
    appended as a last channel, so that a batch of examples stays one tensor (the harness
    subsets and batches ``x`` along its first axis).
    """

    def __init__(self, block_state: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        self.block = MiniLMBlock()
        if block_state is not None:
            self.block.load_bert_layer(block_state)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: Tensor) -> Tensor:
        hidden, mask = x[..., :-1], x[..., -1]
        return self.head(mean_pool(self.block(hidden, mask), mask))
