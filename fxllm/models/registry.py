"""Architecture name (config.json ``architectures``) -> model class."""

from __future__ import annotations

from fxllm.models.bert import BertModel
from fxllm.models.fuyu import FuyuForCausalLM
from fxllm.models.gemma3 import Gemma3ForCausalLM, Gemma3ForConditionalGeneration
from fxllm.models.gpt2 import GPT2LMHeadModel
from fxllm.models.interface import ModelClass
from fxllm.models.internlm2 import InternLM2ForCausalLM
from fxllm.models.internvl import InternVLChatModel, InternVLForConditionalGeneration
from fxllm.models.llama import LlamaForCausalLM
from fxllm.models.llava import LlavaForConditionalGeneration
from fxllm.models.llava_next import LlavaNextForConditionalGeneration
from fxllm.models.moe_decoder import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from fxllm.models.olmoe import OlmoeForCausalLM
from fxllm.models.opt import OPTForCausalLM
from fxllm.models.persimmon import PersimmonForCausalLM
from fxllm.models.phi3 import Phi3ForCausalLM
from fxllm.models.qwen2_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

MODEL_REGISTRY: dict[str, ModelClass] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "GraniteForCausalLM": LlamaForCausalLM,
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "PersimmonForCausalLM": PersimmonForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "OPTForCausalLM": OPTForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "BertModel": BertModel,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
    "InternVLChatModel": InternVLChatModel,
    "InternVLForConditionalGeneration": InternVLForConditionalGeneration,
    "FuyuForCausalLM": FuyuForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "LlavaNextForConditionalGeneration": LlavaNextForConditionalGeneration,
}
# Encoders without an LM head: they only pool (embed / encode / score), never generate.
POOLING_ONLY_ARCHITECTURES = frozenset({"BertModel"})
# Vision-language checkpoints -> the modalities fxllm feeds them (their classes take a
# MultiModalConfig). Gemma 3's runs text-only, with limit_mm_per_prompt={"image": 0}.
MULTIMODAL_ARCHITECTURES: dict[str, frozenset[str]] = {
    "Qwen2VLForConditionalGeneration": frozenset({"image", "video"}),
    "Qwen2_5_VLForConditionalGeneration": frozenset({"image", "video"}),
    "Gemma3ForConditionalGeneration": frozenset(),
    "InternVLChatModel": frozenset({"image"}),
    "InternVLForConditionalGeneration": frozenset({"image"}),
    "FuyuForCausalLM": frozenset({"image"}),
    "LlavaForConditionalGeneration": frozenset({"image"}),
    "LlavaNextForConditionalGeneration": frozenset({"image"}),
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def resolve_architecture(architectures: list[str] | None, source: str) -> tuple[str, ModelClass]:
    """The first supported architecture of a config, or a clear error."""
    if not architectures:
        raise ValueError(
            f"{source} names no 'architectures'; set one with hf_overrides={{'architectures': "
            f"['LlamaForCausalLM']}}. Supported: {', '.join(supported_architectures())}"
        )
    for name in architectures:
        if name in MODEL_REGISTRY:
            return name, MODEL_REGISTRY[name]
    raise ValueError(
        f"architecture {', '.join(architectures)} (from {source}) is not supported. "
        f"Supported: {', '.join(supported_architectures())}"
    )
