"""InternVL (both layouts, each decoder), Fuyu, LLaVA, LLaVA-NeXT and the new text decoders (InternLM2, Phi-3,
Persimmon) on a CUDA device in bfloat16 (skipped without one): greedy tokens may differ from
transformers' fp32 ones only between near ties — at the first differing token, each side's token
is among the other's top-k."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fxllm import LLM, SamplingParams
from tests.test_internlm2_phi3 import LONG_PROMPT, SHORT_PROMPT, phi3_config
from tests.test_vlm_models import CHUNKED_BUDGET, batch, request
from tests.tiny_fuyu_models import save_tiny_persimmon
from tests.tiny_internvl_models import save_tiny_internlm2
from tests.tiny_models import save_config_checkpoint
from tests.vlm_cases import CASES, IMAGES, greedy_steps

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
NEW_TOKENS = 10
TOP_K = 5
MAX_MODEL_LEN = 128
TEXT_MAX_MODEL_LEN = 96  # InternLM2's tiny limit (48 positions x its dynamic NTK factor)
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("vlm_gpu")
    built = {name: case.build(root) for name, case in CASES.items()}
    built["internlm2"] = save_tiny_internlm2(root / "internlm2_text")
    phi3 = save_config_checkpoint(phi3_config(), root / "phi3")
    persimmon = save_tiny_persimmon(root / "persimmon")
    built["phi3"], built["persimmon"] = (phi3, phi3), (persimmon, persimmon)
    return built


def assert_diverges_only_between_near_ties(completion, reference: list[tuple[int, list[int]]]) -> None:
    """``reference``: transformers' (greedy token, top-k tokens) of each step."""
    mine, theirs = completion.token_ids, [token for token, _ in reference]
    if mine == theirs:
        return
    first = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
    assert mine[first] in reference[first][1]  # both sides saw the same tokens before it
    ours = sorted(completion.logprobs[first].items(), key=lambda item: item[1].rank)[:TOP_K]
    assert theirs[first] in [token for token, _ in ours]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager_chunked", "compiled"])
def test_bf16_vision_language_models_diverge_only_between_near_ties(checkpoints, name, compiled, tmp_path):
    """Eager with chunks that end inside images (Triton attention over chunked prefill); compiled
    with the vision tower compiled too."""
    case = CASES[name]
    model_dir, reference_dir = checkpoints[name]
    settings = (
        dict(compilation_config={"level": 3, "cache_dir": str(tmp_path), "compile_mm_encoder": True})
        if compiled
        else dict(enforce_eager=True, max_num_batched_tokens=CHUNKED_BUDGET)
    )
    llm = LLM(model=str(model_dir), device=DEVICE, dtype="bfloat16", max_model_len=MAX_MODEL_LEN, **settings)
    prompts = batch(case)
    outputs = llm.generate([request(text, images) for text, images in prompts], PARAMS, use_tqdm=False)
    for (text, images), output in zip(prompts, outputs):
        model, prompt_ids, image_inputs = case.oracle_inputs(reference_dir, text, tuple(IMAGES[n] for n in images))
        assert output.prompt_token_ids == prompt_ids
        reference = greedy_steps(model, prompt_ids, image_inputs, NEW_TOKENS, TOP_K)
        assert_diverges_only_between_near_ties(output.outputs[0], reference)


@pytest.mark.parametrize("name", ["internlm2", "phi3", "persimmon"])
def test_bf16_text_models_diverge_only_between_near_ties(checkpoints, name):
    """Compiled with CUDA graphs; prompts past InternLM2's and Phi-3's original lengths, against
    transformers token by token (the per-position dynamic NTK and LongRoPE frequencies)."""
    model_dir, reference_dir = checkpoints[name]
    llm = LLM(model=str(model_dir), device=DEVICE, dtype="bfloat16", max_model_len=TEXT_MAX_MODEL_LEN)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    for output in llm.generate([SHORT_PROMPT, LONG_PROMPT], PARAMS, use_tqdm=False):
        assert_diverges_only_between_near_ties(output.outputs[0], _token_by_token(reference, output.prompt_token_ids))


def _token_by_token(model: torch.nn.Module, prompt_ids: list[int]) -> list[tuple[int, list[int]]]:
    """transformers' (greedy token, top-k) per step, every token through its own cached forward."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids, steps = list(prompt_ids), []
    with torch.no_grad():
        for position in range(len(prompt_ids) + NEW_TOKENS - 1):
            logits = model(
                input_ids=torch.tensor([[ids[position]]]), position_ids=torch.tensor([[position]]), cache=cache, use_cache=True
            ).logits[0, -1]
            if position >= len(prompt_ids) - 1:
                steps.append((int(logits.argmax()), logits.topk(TOP_K).indices.tolist()))
                ids.append(steps[-1][0])
    return steps
