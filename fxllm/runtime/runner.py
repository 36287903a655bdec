"""ModelRunner: owns the model, the KV cache tensors and the sampler, and runs one step.

A step's requests are flattened into one token dimension T (DESIGN.md contract 1):
``input_ids[T]``, ``positions[T]``, ``slot_mapping[T]`` plus per-request
``block_tables``, ``seq_lens`` and ``query_start_loc``. The model is called inside
the forward context, then logits are computed only for rows that sample.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fxllm.compiler import compile_model
from fxllm.config import CUDAGraphMode, EngineConfig
from fxllm.models.loader import build_model
from fxllm.runtime.attention.layer import Attention, AttentionSpec
from fxllm.runtime.attention.torch_backend import TorchAttentionBackend
from fxllm.runtime.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from fxllm.runtime.kv_cache import cdiv
from fxllm.runtime.sampler import Sampler, SamplingBatch
from fxllm.runtime.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.device
        self.block_size = config.cache.block_size
        model_config = config.model
        self.model: nn.Module = build_model(
            model_config.hf_config, Path(model_config.model), model_config.dtype, self.device, model_config.max_model_len
        )
        self.vocab_size = model_config.vocab_size
        self.layers: dict[str, AttentionSpec] = {
            module.spec.layer_name: module.spec for module in self.model.modules() if isinstance(module, Attention)
        }
        self.backend = TorchAttentionBackend()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(config.seed)
        self.sampler = Sampler(generator)
        self.kv_caches: dict[str, torch.Tensor] = {}
        self._log_cudagraph_settings()
        self.forward_fn, self.compile_report = compile_model(self.model, config, self._profile_context)
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.num_blocks = 0

    def _profile_context(self):
        """A forward context without attention metadata: attention is skipped (no KV cache yet)."""
        return set_forward_context(ForwardContext(None, {}, self.layers, self.backend))

    def _log_cudagraph_settings(self) -> None:
        compilation = self.config.compilation
        unset = compilation.cudagraph_capture_sizes is None and compilation.cudagraph_mode is None
        if unset or compilation.cudagraph_mode is CUDAGraphMode.NONE:
            return
        if self.device.type == "cpu":
            logger.info("cudagraph_capture_sizes/cudagraph_mode do not apply on CPU: no CUDA graphs are captured")
        else:
            logger.info("CUDA graphs are not captured yet: cudagraph_capture_sizes/cudagraph_mode are ignored")

    # ---- KV cache sizing and allocation -------------------------------------------------

    def bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.config.model.dtype).element_size()
        per_layer = sum(2 * self.block_size * s.num_kv_heads * s.head_dim for s in self.layers.values())
        return per_layer * element

    def determine_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if self.device.type == "cpu":
            # Host memory is shared with everything else: take no more than the scheduler
            # could ever fill (every sequence at max_model_len).
            scheduler = self.config.scheduler
            usable = scheduler.max_num_seqs * cdiv(self.config.model.max_model_len, self.block_size)
            return min(cache.cpu_kvcache_space_bytes // self.bytes_per_block(), usable)
        return self._profile_gpu_blocks()

    def _profile_gpu_blocks(self) -> int:
        """Blocks that fit in gpu_memory_utilization after a forward at full token budget
        plus logits and sampling for max_num_seqs rows."""
        torch.cuda.synchronize(self.device)
        free_before, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free_before) - torch.cuda.memory_reserved(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        scheduler = self.config.scheduler
        num_tokens = scheduler.max_num_batched_tokens
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device) % self.config.model.max_model_len
        with torch.inference_mode(), self._profile_context():
            hidden = self.forward_fn(input_ids, positions)
        rows = min(scheduler.max_num_seqs, num_tokens)
        with torch.inference_mode():
            logits = self.model.compute_logits(hidden[:rows])
            probs = logits.float().softmax(-1)
            probs.sort(dim=-1, descending=True)
        del hidden, logits, probs
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        available = int(total * self.config.cache.gpu_memory_utilization) - peak - non_torch
        num_blocks = max(available, 0) // self.bytes_per_block()
        logger.info(
            "memory profile: peak %.2f GiB, non-torch %.2f GiB -> %d KV blocks (%.2f GiB)",
            peak / 2**30, non_torch / 2**30, num_blocks, num_blocks * self.bytes_per_block() / 2**30,
        )
        torch.cuda.empty_cache()
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One tensor per layer: [2, num_blocks, block_size, kv_heads, head_dim].

        Left uninitialized (zeroing GiBs of host memory costs seconds): attention
        backends never let a slot past a sequence's length reach the output."""
        self.num_blocks = num_blocks
        dtype = self.config.model.dtype
        self.kv_caches = {
            name: torch.empty(
                2, num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=self.device
            )
            for name, spec in self.layers.items()
        }

    # ---- one step ----------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> list[int]:
        """Run the model for the scheduled tokens; return one sampled token per sampling request."""
        input_ids, positions, slot_mapping, query_start_loc, seq_lens, sample_rows = [], [], [], [0], [], []
        block_size = self.block_size
        for scheduled in step.scheduled:
            request = scheduled.request
            start, end = request.num_computed_tokens, request.num_computed_tokens + scheduled.num_new_tokens
            input_ids.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            blocks = request.block_ids
            slot_mapping.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
            query_start_loc.append(query_start_loc[-1] + scheduled.num_new_tokens)
            seq_lens.append(end)
            if scheduled.samples:
                sample_rows.append(query_start_loc[-1] - 1)
        max_blocks = max(cdiv(length, block_size) for length in seq_lens)
        # Rows padded with block 0: entries past a request's seq_len are never read.
        block_tables = [s.request.block_ids + [0] * (max_blocks - len(s.request.block_ids)) for s in step.scheduled]

        device = self.device
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            block_tables=torch.tensor(block_tables, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=query_start_loc,
        )
        context = ForwardContext(metadata, self.kv_caches, self.layers, self.backend)
        with set_forward_context(context):
            hidden = self.forward_fn(
                torch.tensor(input_ids, dtype=torch.long, device=device),
                torch.tensor(positions, dtype=torch.long, device=device),
            )  # [T, hidden]
        if not sample_rows:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=device)])  # [S, vocab]
        sampling_requests = [s.request for s in step.scheduled if s.samples]
        batch = SamplingBatch.from_requests(sampling_requests, self.vocab_size, device)
        return self.sampler(logits, batch).tolist()
