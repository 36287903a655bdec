"""Sharding plans: how each architecture family's weights split over tensor-parallel ranks.

A plan names checkpoint modules (HF names, before the loader fuses q/k/v and gate/up;
the row- and vocab-parallel ones keep their names in the model, which is how the TP
pass finds them): column-parallel weights are cut along the output dim, row-parallel
ones along the input dim, vocab-parallel ones along the vocabulary; the rest (norms,
position embeddings) is replicated. Modules whose checkpoint stores the weight as
[in, out] (GPT-2's Conv1D) are listed as transposed: their dims swap.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Split(enum.Enum):
    QUERY = "query"  # column-parallel by query heads
    KEY_VALUE = "key_value"  # column-parallel by KV heads (or one replicated KV head)
    FUSED_QKV = "fused_qkv"  # q, k and v stacked along the output dim, each cut by its heads
    COLUMN = "column"  # column-parallel by equal parts of the output dim
    ROW = "row"
    VOCAB = "vocab"
    REPLICATED = "replicated"


@dataclass(frozen=True)
class ShardingPlan:
    splits: dict[str, Split]
    transposed: frozenset[str] = field(default_factory=frozenset)

    def split_of(self, tensor_name: str) -> Split:
        """How a checkpoint tensor or model parameter of that name is split."""
        return self.splits.get(_module_of(tensor_name), Split.REPLICATED)

    def is_transposed(self, tensor_name: str) -> bool:
        return _module_of(tensor_name) in self.transposed


def _module_of(tensor_name: str) -> str:
    parts = tensor_name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


LLAMA_PLAN = ShardingPlan({
    "q_proj": Split.QUERY,
    "k_proj": Split.KEY_VALUE,
    "v_proj": Split.KEY_VALUE,
    "gate_proj": Split.COLUMN,
    "up_proj": Split.COLUMN,
    "o_proj": Split.ROW,
    "down_proj": Split.ROW,
    "embed_tokens": Split.VOCAB,
    "lm_head": Split.VOCAB,
})
GPT2_PLAN = ShardingPlan(
    {
        "c_attn": Split.FUSED_QKV,
        "c_fc": Split.COLUMN,
        "c_proj": Split.ROW,  # attention's output projection and the MLP's down projection
        "wte": Split.VOCAB,  # also the tied lm_head
        "lm_head": Split.VOCAB,
    },
    transposed=frozenset({"c_attn", "c_fc", "c_proj"}),
)
OPT_PLAN = ShardingPlan({
    "q_proj": Split.QUERY,
    "k_proj": Split.KEY_VALUE,
    "v_proj": Split.KEY_VALUE,
    "fc1": Split.COLUMN,
    "out_proj": Split.ROW,
    "fc2": Split.ROW,
    "embed_tokens": Split.VOCAB,  # also the tied lm_head; project_in/out and positions replicated
    "lm_head": Split.VOCAB,
})
# Mixture-of-experts decoders: every rank holds every expert, I/N of each. An expert's gate and
# up projections are column-parallel and its down projection row-parallel, like a dense MLP's;
# the stacked experts (model parameters under "experts", the fxllm::fused_moe op) then output
# a partial sum. Routers ("gate") and Qwen2-MoE's shared_expert_gate are replicated. (OLMoE has
# no plan: its q/k norms span all heads, which no rank holds.)
QWEN_MOE_PLAN = ShardingPlan({**LLAMA_PLAN.splits, "experts": Split.ROW})
MIXTRAL_PLAN = ShardingPlan({**QWEN_MOE_PLAN.splits, "w1": Split.COLUMN, "w3": Split.COLUMN, "w2": Split.ROW})
PLANS: dict[str, ShardingPlan] = {
    "LlamaForCausalLM": LLAMA_PLAN,
    "MistralForCausalLM": LLAMA_PLAN,
    "Qwen2ForCausalLM": LLAMA_PLAN,
    "Qwen3ForCausalLM": LLAMA_PLAN,
    "GraniteForCausalLM": LLAMA_PLAN,
    "MixtralForCausalLM": MIXTRAL_PLAN,
    "Qwen2MoeForCausalLM": QWEN_MOE_PLAN,
    "Qwen3MoeForCausalLM": QWEN_MOE_PLAN,
    "Gemma3ForCausalLM": LLAMA_PLAN,
    "GPT2LMHeadModel": GPT2_PLAN,
    "OPTForCausalLM": OPT_PLAN,
}


def plan_for(architecture: str) -> ShardingPlan:
    if architecture not in PLANS:
        raise ValueError(
            f"tensor parallelism supports {', '.join(sorted(PLANS))} so far, not {architecture}; "
            f"use tensor_parallel_size=1"
        )
    return PLANS[architecture]
