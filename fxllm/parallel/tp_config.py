"""The TP-local view of a model config: what one rank of ``world_size`` builds."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from transformers import PretrainedConfig

from fxllm.hf_config import head_dim_of, intermediate_size_of
from fxllm.parallel.plans import ShardingPlan, plan_for
from fxllm.utils import cdiv


# Widths of MoE models' experts and shared experts (Qwen-MoE), split over ranks like the MLP's.
# (Mixtral's and OLMoE's experts are intermediate_size wide.)
MOE_WIDTHS = ("moe_intermediate_size", "shared_expert_intermediate_size")


@dataclass(frozen=True)
class PackedTensorSplit:
    """Where a quantized layer's checkpoint tensor (ending in ``suffix``) keeps the layer's
    output and input features, so a rank can cut out its part: along ``out_dim`` each
    element covers ``out_per_element`` outputs (a word of packed values: several), along
    ``in_dim`` ``in_per_element`` inputs (packed values, or a group of inputs sharing a
    scale; 0: all of them, the tensor is whole on every rank). None: no such dim."""

    suffix: str
    out_dim: int | None
    out_per_element: int
    in_dim: int | None
    in_per_element: int


@dataclass(frozen=True)
class TPLayout:
    """How a model's heads, MLP and vocabulary split over ``world_size`` ranks."""

    rank: int
    world_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    plan: ShardingPlan
    # (block_n, block_k) one stored weight scale covers, for a block-scaled FP8 checkpoint.
    scale_block: tuple[int, int] | None = None
    # The packed tensors of an integer checkpoint (GPTQ, AWQ, compressed-tensors).
    packed_tensors: tuple[PackedTensorSplit, ...] = ()

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.world_size

    @property
    def kv_replicas(self) -> int:
        """Ranks sharing one KV head: more ranks than KV heads replicate them, as vLLM does."""
        return max(1, self.world_size // self.num_kv_heads)

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.world_size)

    @property
    def first_kv_head(self) -> int:
        return (self.rank // self.kv_replicas) * self.local_kv_heads

    @property
    def local_intermediate(self) -> int:
        return self.intermediate_size // self.world_size

    @property
    def local_vocab(self) -> int:
        """Each rank's vocabulary shard; the last is padded so that the shards are equal."""
        return cdiv(self.vocab_size, self.world_size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.local_vocab


def tp_layout(
    config: PretrainedConfig,
    rank: int,
    world_size: int,
    scale_block: tuple[int, int] | None = None,
    packed_tensors: tuple[PackedTensorSplit, ...] = (),
) -> TPLayout:
    """The split of ``config`` over ``world_size`` ranks; a clear error where it cannot split.
    ``scale_block``: the (block_n, block_k) of a block-scaled FP8 checkpoint's weight scales;
    ``packed_tensors``: how an integer checkpoint's tensors split."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = intermediate_size_of(config)
    problems = []
    if heads % world_size:
        problems.append(f"num_attention_heads={heads} is not divisible by it")
    if world_size <= kv_heads and kv_heads % world_size:
        problems.append(f"num_key_value_heads={kv_heads} is not divisible by it")
    if world_size > kv_heads and world_size % kv_heads:
        problems.append(f"it is not a multiple of num_key_value_heads={kv_heads} (KV heads are replicated then)")
    if intermediate % world_size:
        problems.append(f"intermediate_size={intermediate} is not divisible by it")
    for name in MOE_WIDTHS:
        width = getattr(config, name, None)
        if width and width % world_size:
            problems.append(f"{name}={width} is not divisible by it")
    if problems:
        raise ValueError(
            f"tensor_parallel_size={world_size} cannot split this model: {'; '.join(problems)}. "
            f"Choose a tensor_parallel_size that divides the attention heads and the MLP width"
        )
    plan = plan_for(config.architectures[0])
    return TPLayout(
        rank, world_size, heads, kv_heads, head_dim_of(config), intermediate, config.vocab_size, plan, scale_block,
        packed_tensors,
    )


def tp_local_config(config: PretrainedConfig, layout: TPLayout) -> PretrainedConfig:
    """A copy of ``config`` whose sizes are this rank's, so the model traces local shapes."""
    local = copy.deepcopy(config)
    local.num_attention_heads = layout.local_heads
    local.num_key_value_heads = layout.local_kv_heads
    local.head_dim = layout.head_dim  # no longer hidden_size // heads once heads are split
    if hasattr(config, "n_inner"):
        local.n_inner = layout.local_intermediate
    elif hasattr(config, "ffn_dim"):
        local.ffn_dim = layout.local_intermediate
    else:
        local.intermediate_size = layout.local_intermediate
    for name in MOE_WIDTHS:
        if getattr(config, name, None):
            setattr(local, name, getattr(config, name) // layout.world_size)
    local.vocab_size = layout.local_vocab
    return local
