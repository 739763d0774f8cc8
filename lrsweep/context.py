"""What every training job starts from: the base model, the packed data and the precision."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from lrsweep.config import StudyConfig
from lrsweep.data import Blocks, Examples, load_blocks
from lrsweep.errors import ModelError
from lrsweep.models import BaseModel, load_base_model
from lrsweep.training import Precision


logger = logging.getLogger(__name__)


@dataclass
class Context:
    config: StudyConfig
    base: BaseModel
    blocks: Blocks
    precision: Precision


def prepare(config: StudyConfig) -> Context:
    """Load the base model and the corpus named by ``config`` (the slow part of every job)."""
    base = load_base_model(config.model, config.train, config.seed)
    blocks = load_blocks(config.data, config.train, base.tokenizer, config.seed)
    _check_fits(base, blocks)
    logger.info("model %s on %s (%s)", base.name, base.device, base.dtype)
    return Context(config, base, blocks, Precision(base.device, base.dtype))


def _check_fits(base: BaseModel, blocks: Blocks) -> None:
    """Refuse data the model cannot embed, which would fail at the first step with an
    IndexError (a device-side assert on CUDA): token ids past its embedding table, or
    sequences longer than a learned position table (GPT-2's, OPT's; rotary ones have none)."""
    net = base.model
    embeddings = cast(nn.Embedding, net.get_input_embeddings())
    vocab = embeddings.num_embeddings
    top = max(_top_id(blocks.train), _top_id(blocks.eval))
    if top >= vocab:
        raise ModelError(
            f"model.path: the tokenizer gives id {top}, past the model's {vocab} embeddings "
            "(tokens added without resize_token_embeddings?); save the model with its "
            "embeddings resized"
        )
    config = net.config
    positions = int(
        getattr(config, "n_positions", 0) or getattr(config, "max_position_embeddings", 0) or 0
    )
    learned = positions > 0 and any(
        isinstance(m, nn.Embedding)
        and m is not embeddings
        and positions <= m.num_embeddings <= positions + 2  # OPT's table has an offset of 2
        for m in net.modules()
    )
    longest = max(_longest(blocks.train), _longest(blocks.eval))
    if learned and longest > positions:
        raise ModelError(
            f"train.seq_len: sequences of {longest} tokens, but the model has learned "
            f"positions for {positions}; lower train.seq_len to {positions}"
        )


def _top_id(x: torch.Tensor | Examples) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.max()) if x.numel() else -1
    return max((int(ids.max()) for ids in x.input_ids if ids.numel()), default=-1)


def _longest(x: torch.Tensor | Examples) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[1]
    if x.position_ids is not None:  # packed: positions restart at each example
        return max((int(p.max()) + 1 for p in x.position_ids if p.numel()), default=0)
    return max((len(ids) for ids in x.input_ids), default=0)
