"""Phi-3: a Llama-family decoder whose checkpoint already fuses q/k/v (``qkv_proj``) and gate/up
(``gate_up_proj``), with LongRoPE (short and long rescale factors around
``original_max_position_embeddings``), partial rotary where the config asks for it, and one
sliding window for every layer where the config has one. Also the language model of InternVL2-4B.
"""

from __future__ import annotations

from fxllm.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    # The checkpoint's qkv_proj and gate_up_proj are the model's parameters as they are.
    fused_weights = {}
