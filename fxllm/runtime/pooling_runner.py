"""PoolingRunner: runs whole prompts through a pooling model and pools one vector per prompt.

No KV cache, no chunked prefill, no prefix caching: each forward holds complete
prompts, flattened into one token dimension T as the generative runner does (docs/ARCHITECTURE.md,
contract 1), and attention sees only the step's own K/V (the forward context holds no
caches). The model is compiled by the same pipeline as a generative one.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from fxllm.compiler import compile_model
from fxllm.config import EngineConfig, PoolerConfig
from fxllm.models.interface import Model, attention_layers
from fxllm.models.loader import build_model, weight_bytes
from fxllm.attention.layer import AttentionSpec
from fxllm.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from fxllm.runtime.runner import select_attention_backend

NO_SLOT = -1  # slot_mapping value of a token whose K/V goes to no cache


class PoolingRunner:
    def __init__(self, config: EngineConfig):
        model_config = config.model
        assert model_config.pooler_config is not None, "a pooling model's config resolves its pooler"
        self.config = config
        self.pooler_config: PoolerConfig = model_config.pooler_config
        self.device = config.device
        self.model: Model = build_model(model_config, self.device)
        self.layers: dict[str, AttentionSpec] = attention_layers(self.model)
        self.backend = select_attention_backend(self.device)
        self.compiled = compile_model(self.model, config, self._context_without_metadata)
        self.forward_fn = self.compiled.forward
        self.compile_report = self.compiled.report
        self.compile_report.weight_bytes = weight_bytes(self.model)

    def _context_without_metadata(self):
        """For the compiler's dummy forwards: attention is skipped."""
        return set_forward_context(ForwardContext(None, {}, self.layers, self.backend))

    def plan_batches(self, lengths: list[int]) -> list[range]:
        """Consecutive prompts per forward, within max_num_batched_tokens and max_num_seqs
        (every prompt fits alone: the LLM checks max_num_batched_tokens >= max_model_len)."""
        scheduler = self.config.scheduler
        batches: list[range] = []
        start, num_tokens = 0, 0
        for index, length in enumerate(lengths):
            full = num_tokens + length > scheduler.max_num_batched_tokens or index - start == scheduler.max_num_seqs
            if index > start and full:
                batches.append(range(start, index))
                start, num_tokens = index, 0
            num_tokens += length
        batches.append(range(start, len(lengths)))
        return batches

    @torch.inference_mode()
    def execute(self, prompts: list[list[int]]) -> torch.Tensor:
        """One forward over whole prompts; returns [num_prompts, hidden] float32 on the host."""
        device = self.device
        seq_lens = [len(token_ids) for token_ids in prompts]
        query_start_loc = [0]
        for length in seq_lens:
            query_start_loc.append(query_start_loc[-1] + length)
        num_tokens = query_start_loc[-1]
        metadata = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), NO_SLOT, dtype=torch.long, device=device),
            block_tables=torch.empty(len(prompts), 0, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=query_start_loc,
        )
        input_ids = torch.tensor([t for token_ids in prompts for t in token_ids], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(length, device=device) for length in seq_lens])
        with set_forward_context(ForwardContext(metadata, {}, self.layers, self.backend)):
            hidden = self.forward_fn(input_ids, positions)  # [T, hidden]
        return pool(hidden.float(), query_start_loc, self.pooler_config).cpu()


def pool(hidden: torch.Tensor, query_start_loc: list[int], config: PoolerConfig) -> torch.Tensor:
    """[num_prompts, hidden]: each prompt's rows of ``hidden`` [T, hidden] pooled, then normalized if asked."""
    spans = list(zip(query_start_loc[:-1], query_start_loc[1:]))
    if config.pooling_type == "MEAN":
        pooled = torch.stack([hidden[start:end].mean(0) for start, end in spans])
    elif config.pooling_type == "CLS":
        pooled = hidden[[start for start, _ in spans]]
    else:  # "LAST"
        pooled = hidden[[end - 1 for _, end in spans]]
    return F.normalize(pooled, p=2, dim=-1) if config.normalize else pooled
