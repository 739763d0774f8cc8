"""What every training job starts from: the base model, the packed data and the precision."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lrsweep.config import StudyConfig
from lrsweep.data import Blocks, load_blocks
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
    logger.info("model %s on %s (%s)", base.name, base.device, base.dtype)
    return Context(config, base, blocks, Precision(base.device, base.dtype))
