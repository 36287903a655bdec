"""ModelRunner: owns the model, the KV cache tensors and the sampler, and runs one step.

A step's requests are flattened into one token dimension T (docs/ARCHITECTURE.md, contract 1):
``input_ids[T]``, ``positions[T]``, ``slot_mapping[T]`` plus per-request
``block_tables``, ``seq_lens`` and ``query_start_loc``. The model is called inside
the forward context, then logits are computed only for rows that sample.

A vision-language model takes ``inputs_embeds[T, H]`` instead (and Qwen2-VL M-RoPE
``positions[3, T]``): the embedder merges image embeddings into the token embeddings each step.
Its steps run without CUDA graphs (they would need the embeddings in a persistent
buffer too).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from fxllm.compiler import compile_model
from fxllm.compiler.cudagraph import CUDAGraphWrapper
from fxllm.compiler.pipeline import dummy_inputs
from fxllm.config import CompilationConfig, CompilationLevel, CUDAGraphMode, EngineConfig
from fxllm.attention.layer import AttentionSpec
from fxllm.attention.selector import select_attention_backend
from fxllm.forward_context import ForwardContext, GraphDispatch, set_forward_context
from fxllm.models.interface import Model, attention_layers
from fxllm.models.loader import build_model, model_tp_layout, weight_bytes
from fxllm.models.sharded_state import save_sharded_state
from fxllm.parallel.collectives import gather_logits
from fxllm.parallel.tp_config import TPLayout
from fxllm.runtime.cudagraph_dispatch import CUDAGraphPlan, capture_graphs
from fxllm.runtime.logits_processors import ProcessorBatch
from fxllm.runtime.multimodal.embedder import MultiModalEmbedder
from fxllm.runtime.penalty_state import PenaltyState
from fxllm.runtime.sampler import Sampler, SamplingBatch
from fxllm.runtime.request import Request
from fxllm.runtime.scheduler import SchedulerOutput
from fxllm.runtime.step_inputs import PreparedStep, StepInputs
from fxllm.runtime.structured_outputs.bitmask import GrammarBitmask
from fxllm.runtime.logprobs import TokenLogprobs
from fxllm.runtime.step_observer import StepPhases
from fxllm.runtime.step_result import LaunchedStep
from fxllm.utils import cdiv

if TYPE_CHECKING:
    from fxllm.runtime.executor.step_sync import ReceivedStep

logger = logging.getLogger(__name__)

# Device memory the captured graphs themselves take beyond their pool (kernel nodes,
# launch parameters).
CUDA_GRAPH_OVERHEAD_BYTES = 256 << 20
# The start-up step that builds the kernels of steps with prompt tokens (``warm_up``): any
# shape with more tokens than requests does.
WARM_UP_REQUESTS = 2
WARM_UP_TOKENS_PER_REQUEST = 4


@dataclass
class StepPlan:
    """A scheduled step with its inputs prepared on the host, ready to execute."""

    step: SchedulerOutput
    prepared: PreparedStep
    dispatch: GraphDispatch
    sampling: list[Request]  # the requests that sample, in row order
    prompt_rows: list[tuple[Request, list[int], list[int]]]  # (request, rows, targets) of prompt logprobs

    @property
    def prompt_logit_rows(self) -> list[int]:
        return [row for _, rows, _ in self.prompt_rows for row in rows]


class RankSync(Protocol):
    """How the ranks of a tensor-parallel engine meet during start-up (the executor's)."""

    def barrier(self) -> None:
        """Every rank waits here; a rank that failed stops the others at once."""

    def min(self, value: int) -> int:
        """The smallest ``value`` of any rank."""


class SingleRank:
    """One process is the whole engine: nothing to meet."""

    def barrier(self) -> None:
        pass

    def min(self, value: int) -> int:
        return value


class ModelRunner:
    """One rank's model, KV cache, CUDA graphs and sampler. Under tensor parallelism every rank
    has one; the executor owns them and carries each step to the other ranks."""

    def __init__(self, config: EngineConfig, rank: int = 0, phases: StepPhases | None = None):
        self.config = config
        self.phases = phases or StepPhases()
        self.device = config.device
        self.block_size = config.cache.block_size
        model_config = config.model
        world_size = config.parallel.tensor_parallel_size
        # This rank's part of a tensor-parallel model; None on one device.
        self.tp_layout = model_tp_layout(model_config.hf_config, rank, world_size) if world_size > 1 else None
        self.vocab_size = model_config.vocab_size
        generator = torch.Generator(device=self.device)
        generator.manual_seed(config.seed)
        self.sampler = Sampler(generator)
        self.penalty_state = PenaltyState(config.scheduler.max_num_seqs, self.vocab_size, self.device)
        self.grammar_bitmask = GrammarBitmask(config.scheduler.max_num_seqs, self.vocab_size, self.device)
        # vLLM's batch-level processors, on the rank that samples; they read outputs on the host,
        # so their engine runs step by step under async scheduling.
        self.logits_processors: ProcessorBatch | None = None
        if config.logits_processors and rank == 0:
            pin = self.device.type == "cuda"
            instances = [cls(config, self.device, pin) for cls in config.logits_processors]
            self.logits_processors = ProcessorBatch(instances, self.device)
        self.backend = select_attention_backend(self.device)
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.num_blocks = 0
        self.graph_plan = CUDAGraphPlan.resolve(config)

    def start(self, ranks: RankSync | None = None) -> int:
        """Load and compile the model, size and allocate the KV cache, capture the CUDA graphs
        and warm up; returns the number of KV blocks. ``ranks``: under tensor parallelism, where
        the ranks meet after each phase and agree on the cache size."""
        ranks = ranks or SingleRank()
        config = self.config
        load_start = time.perf_counter()
        self.model: Model = build_model(config.model, self.device, self.tp_layout)
        load_seconds = time.perf_counter() - load_start
        ranks.barrier()
        self.layers: dict[str, AttentionSpec] = attention_layers(self.model)
        self.embedder = MultiModalEmbedder(self.model) if self.model.takes_inputs_embeds else None
        self.compiled = compile_model(
            self.model, config, self._profile_context, self.tp_layout, bool(self.graph_plan.piecewise_sizes)
        )
        ranks.barrier()
        self.forward_fn = self.compiled.forward
        self.compile_report = self.compiled.report
        self.compile_report.cudagraph_mode = self.graph_plan.mode.value
        self.compile_report.load_seconds = round(load_seconds, 2)
        self.compile_report.weight_bytes = weight_bytes(self.model)
        self.compile_report.mm_encoder_compiled = self._compile_vision_encoder(config.compilation)
        # The whole forward and its logits, for decode-only steps. Not a bound method: the runner
        # holds the graphs, and a cycle back to it would keep the engine (and its device memory)
        # alive after ``del llm`` until the garbage collector ran.
        self.full_graph = CUDAGraphWrapper(
            functools.partial(forward_with_logits, self.forward_fn, self.model, self.tp_layout), CUDAGraphMode.FULL
        )
        scheduler = config.scheduler
        with torch.inference_mode():  # inference tensors, like the ones the model was compiled with
            self.inputs = StepInputs(
                max_num_tokens=scheduler.max_num_batched_tokens,
                # Graphs are captured on idle steps of one request per token.
                max_num_requests=max((scheduler.max_num_seqs, *self.graph_plan.piecewise_sizes)),
                max_blocks_per_seq=cdiv(config.model.max_model_len, self.block_size),
                block_size=self.block_size,
                device=self.device,
                mrope=self.model.uses_mrope,
            )
        num_blocks = ranks.min(self.determine_num_blocks())
        self._check_cache_holds_one_request(num_blocks)
        self.allocate_kv_cache(num_blocks)
        self.capture_cudagraphs()
        self.warm_up()
        return num_blocks

    def _check_cache_holds_one_request(self, num_blocks: int) -> None:
        max_model_len = self.config.model.max_model_len
        needed = cdiv(max_model_len, self.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks ({num_blocks * self.block_size} tokens) but one request "
                f"of max_model_len={max_model_len} needs {needed}: lower max_model_len, or give the cache "
                f"more memory (gpu_memory_utilization on GPU, FXLLM_CPU_KVCACHE_SPACE on CPU, or "
                f"num_gpu_blocks_override)"
            )

    def _profile_context(self):
        """A forward context without attention metadata: attention is skipped (no KV cache yet)."""
        return set_forward_context(ForwardContext(None, {}, self.layers, self.backend))

    # ---- KV cache sizing and allocation -------------------------------------------------

    def bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.config.model.dtype).element_size()
        per_layer = sum(2 * self.block_size * s.num_kv_heads * s.head_dim for s in self.layers.values())
        return per_layer * element

    def determine_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if cache.kv_cache_memory_bytes is not None:
            return cache.kv_cache_memory_bytes // self.bytes_per_block()
        if self.device.type == "cpu":
            # Host memory is shared with everything else: take no more than the scheduler
            # could ever fill (every sequence at max_model_len).
            scheduler = self.config.scheduler
            usable = scheduler.max_num_seqs * cdiv(self.config.model.max_model_len, self.block_size)
            return min(cache.cpu_kvcache_space_bytes // self.bytes_per_block(), usable)
        return self._profile_gpu_blocks()

    def _profile_gpu_blocks(self) -> int:
        """Blocks that fit in this engine's share (gpu_memory_utilization) of the card after
        its weights, a forward at full token budget plus logits and sampling for
        max_num_seqs rows, and non-torch memory; never more than is actually free (other
        engines in this process or other processes may hold memory)."""
        device = self.device
        start = time.perf_counter()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        free_before, total = torch.cuda.mem_get_info(device)
        non_torch = (total - free_before) - torch.cuda.memory_reserved(device)
        allocated_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        scheduler = self.config.scheduler
        num_tokens = scheduler.max_num_batched_tokens
        with torch.inference_mode(), self._profile_context():
            hidden = self.forward_fn(*dummy_inputs(self.model, self.config, num_tokens))
        rows = min(scheduler.max_num_seqs, num_tokens)
        with torch.inference_mode():
            logits = self._logits(hidden[:rows])
            probs = logits.float().softmax(-1)
            probs.sort(dim=-1, descending=True)
        del hidden, logits, probs
        torch.cuda.synchronize(device)
        activation_peak = torch.cuda.max_memory_allocated(device) - allocated_before
        weights = self.compile_report.weight_bytes
        torch.cuda.empty_cache()
        free_after = torch.cuda.mem_get_info(device)[0]
        graphs = self._cudagraph_reserve(activation_peak)
        share = int(total * self.config.cache.gpu_memory_utilization) - weights - activation_peak - non_torch - graphs
        available = min(share, free_after - activation_peak - graphs)
        num_blocks = max(available, 0) // self.bytes_per_block()
        self.compile_report.memory_profile_seconds = round(time.perf_counter() - start, 2)
        logger.info(
            "memory profile: weights %.2f GiB, activation peak %.2f GiB, non-torch %.2f GiB, CUDA graphs %.2f GiB "
            "-> %d KV blocks (%.2f GiB)",
            weights / 2**30, activation_peak / 2**30, non_torch / 2**30, graphs / 2**30, num_blocks,
            num_blocks * self.bytes_per_block() / 2**30,
        )
        return num_blocks

    def _cudagraph_reserve(self, activation_peak: int) -> int:
        """Room for the graph pool, captured after the KV cache is allocated: the activations
        of the largest captured step (its share of the peak profiled at the full token
        budget) and the graphs themselves."""
        plan = self.graph_plan
        largest = max((*plan.piecewise_sizes, *plan.full_sizes), default=0)
        if not largest:
            return 0
        return activation_peak * largest // self.config.scheduler.max_num_batched_tokens + CUDA_GRAPH_OVERHEAD_BYTES

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

    def prepare(self, step: SchedulerOutput, previous: LaunchedStep | None = None) -> StepPlan:
        """The host side of a step: its inputs in the persistent buffers (pending tokens not yet
        filled in), its CUDA-graph dispatch and the rows whose logits it needs. ``previous``: the
        step still in flight (async scheduling), whose sampled ids are on the device."""
        prompt_rows = self._prompt_logprob_rows(step)
        # A FULL graph computes the logits of its own rows only, not those of prompt logprobs.
        dispatch = self.graph_plan.dispatch(step.num_tokens, len(step.scheduled), full_allowed=not prompt_rows)
        with torch.inference_mode(), self.phases("inputs"):
            prepared = self.inputs.prepare(step.scheduled, dispatch, previous.sample_rows if previous else None)
        sampling = [s.request for s in step.scheduled if s.samples]
        return StepPlan(step, prepared, dispatch, sampling, prompt_rows)

    def worker_logit_rows(self, plan: StepPlan) -> torch.Tensor:
        """The rows whose logits every rank joins the gather of (none in a FULL graph: inside it)."""
        if plan.dispatch.mode is CUDAGraphMode.FULL:
            rows: list[int] = []
        else:
            rows = self.inputs.host_sample_rows(len(plan.sampling)) + plan.prompt_logit_rows
        return torch.tensor(rows, dtype=torch.int64)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queue the model for a prepared step and the sampling of one token per request that
        reached its last token (prompt logprobs are gathered before it returns)."""
        prepared, dispatch = plan.prepared, plan.dispatch
        if prepared.num_pending:
            self.inputs.fill_pending(prepared, previous.token_ids)
        num_samples = len(plan.sampling)
        extra_rows = plan.prompt_logit_rows
        if dispatch.mode is CUDAGraphMode.FULL:
            with self.phases("device work"):
                logits = self._forward(prepared, dispatch)[prepared.sample_rows]  # the graph's logits
        else:
            inputs_embeds = self.embedder.inputs_embeds(plan.step.scheduled, prepared.input_ids) if self.embedder else None
            with self.phases("device work"):
                hidden = self._forward(prepared, dispatch, inputs_embeds)  # [T_padded, hidden]
                rows = prepared.sample_rows
                if extra_rows:
                    rows = torch.cat([rows.long(), torch.tensor(extra_rows, device=self.device)])
                # One logits computation for every row that needs one (one gather under TP).
                logits = self._logits(hidden[rows]) if rows.numel() else None  # [S + prompt rows, vocab]
        launched = LaunchedStep(plan.step, plan.sampling, reads_outputs=self.logits_processors is not None)
        if plan.sampling:
            with self.phases("grammar masks"):
                grammar = self.grammar_bitmask.fill(plan.sampling)
            with self.phases("sampling batch"):
                processors = self.logits_processors.step(plan.sampling) if self.logits_processors else None
                batch = SamplingBatch.from_requests(
                    plan.sampling, self.vocab_size, self.device, self.penalty_state, grammar, processors
                )
            with self.phases("device work"):
                sampled = self.sampler(logits[:num_samples], batch)
            launched.set_sampled(sampled)
        offset = num_samples
        for request, rows_of_request, targets in plan.prompt_rows:
            request_logits = logits[offset : offset + len(rows_of_request)]
            launched.prompt_logprobs[request] = self._prompt_logprobs(request_logits, targets, request)
            offset += len(rows_of_request)
        return launched

    @torch.inference_mode()
    def execute_received(self, step: ReceivedStep, pending_ids: torch.Tensor | None) -> None:
        """A tensor-parallel worker's step: the forward rank 0 sent, and its part of the
        logits gather; sampling stays with rank 0. ``pending_ids``: rank 0's sampled ids of
        the step before (async scheduling)."""
        dispatch, prepared = step.dispatch, step.prepared
        if prepared.num_pending:
            self.inputs.fill_pending(prepared, pending_ids)
        if dispatch.mode is CUDAGraphMode.FULL:
            self._forward(prepared, dispatch)  # the logits gather is inside the graph
        else:
            hidden = self._forward(prepared, dispatch)
            if step.logit_rows.numel():
                self._logits(hidden[step.logit_rows])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return compute_logits(self.model, self.tp_layout, hidden)

    def save_sharded_state(self, directory: Path) -> None:
        """This rank's weights as loaded (fused, sharded) in one file: load_format="sharded_state"."""
        rank = 0 if self.tp_layout is None else self.tp_layout.rank
        world_size = 1 if self.tp_layout is None else self.tp_layout.world_size
        save_sharded_state(self.model, directory, rank, world_size)

    def _forward(
        self,
        prepared: PreparedStep,
        dispatch: GraphDispatch | None,
        inputs_embeds: torch.Tensor | None = None,
        capture_pool: object = None,
    ) -> torch.Tensor:
        """Hidden states [T_padded, hidden]; for a FULL step, the logits of every row (the graph's)."""
        context = ForwardContext(prepared.metadata, self.kv_caches, self.layers, self.backend, dispatch, capture_pool)
        forward = self.full_graph if dispatch is not None and dispatch.mode is CUDAGraphMode.FULL else self.forward_fn
        with set_forward_context(context):
            return forward(prepared.input_ids if inputs_embeds is None else inputs_embeds, prepared.positions)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run a step shaped like prompt chunks, so that the kernels only such steps use
        (Triton's attention for them is compiled on first use) are built during start-up,
        not inside the first ``generate``. Decode-only steps are warm from graph capture."""
        if not self.backend.compiles_on_first_use:
            return
        prepared = self.inputs.prepare_idle(WARM_UP_REQUESTS, WARM_UP_TOKENS_PER_REQUEST)
        # A vision-language model takes token embeddings (no image here: the text's own).
        inputs_embeds = self.model.embed_input_ids(prepared.input_ids) if self.embedder else None
        self._forward(prepared, None, inputs_embeds)

    @torch.inference_mode()
    def capture_cudagraphs(self) -> None:
        """Capture the planned graphs (after the KV cache exists: attention runs while capturing)."""
        if self.graph_plan.enabled:
            capture_graphs(self.graph_plan, self._run_idle_step, self.compile_report)

    def _run_idle_step(self, size: int, mode: CUDAGraphMode, capture_pool: object) -> None:
        """A decode-only step of ``size`` empty requests in ``mode``; with a pool, its graphs capture."""
        self._forward(self.inputs.prepare_idle(size), GraphDispatch(mode, size, size), capture_pool=capture_pool)

    def _compile_vision_encoder(self, compilation: CompilationConfig) -> bool:
        """Compile the vision tower's regions where ``compile_mm_encoder`` asks (they compile
        on the first image, outside start-up); whether it did."""
        wanted = compilation.compile_mm_encoder and compilation.level > CompilationLevel.NO_COMPILATION
        if not (wanted and compilation.use_inductor):
            return False
        return self.model.compile_vision_encoder()

    def release_cudagraphs(self) -> None:
        """Drop every captured graph: under tensor parallelism, before the process group is
        destroyed (which waits forever on a communicator whose collectives a live graph holds)."""
        if hasattr(self, "full_graph"):
            self.full_graph.release()
            self.compiled.release_cudagraphs()

    @staticmethod
    def _prompt_logprob_rows(step: SchedulerOutput) -> list[tuple[Request, list[int], list[int]]]:
        """(request, rows of the step, target token ids) for requests that want prompt logprobs."""
        found, first_row = [], 0
        for scheduled in step.scheduled:
            request = scheduled.request
            start, end = request.num_computed_tokens, request.num_computed_tokens + scheduled.num_new_tokens
            if request.prompt_logprobs is not None:
                # Row of token t predicts prompt token t + 1; skip targets already recorded
                # (a preempted request recomputes its prompt).
                first_target = max(start + 1, len(request.prompt_logprobs))
                targets = range(first_target, min(end + 1, request.num_prompt_tokens))
                if targets:
                    rows = [first_row + t - 1 - start for t in targets]
                    found.append((request, rows, [request.prompt_token_ids[t] for t in targets]))
            first_row += scheduled.num_new_tokens
        return found

    def _prompt_logprobs(self, logits: torch.Tensor, targets: list[int], request: Request) -> list[TokenLogprobs]:
        logprobs = logits.float().log_softmax(-1)
        target_ids = torch.tensor(targets, device=self.device)
        target_logprobs = logprobs.gather(1, target_ids[:, None])[:, 0]
        ranks = ((logprobs > target_logprobs[:, None]).sum(-1) + 1).tolist()
        top_logprobs, top_ids = logprobs.topk(request.sampling_params.prompt_logprobs, dim=-1)
        top_logprobs, top_ids, target_logprobs = top_logprobs.tolist(), top_ids.tolist(), target_logprobs.tolist()
        return [
            TokenLogprobs(targets[i], target_logprobs[i], ranks[i], top_ids[i], top_logprobs[i])
            for i in range(len(targets))
        ]


def compute_logits(model: nn.Module, tp_layout: TPLayout | None, hidden: torch.Tensor) -> torch.Tensor:
    """[rows, vocab]; under tensor parallelism every rank's vocab shard, gathered."""
    logits = model.compute_logits(hidden)
    return logits if tp_layout is None else gather_logits(logits, tp_layout)


def forward_with_logits(
    forward: Callable[..., torch.Tensor], model: nn.Module, tp_layout: TPLayout | None, *inputs: torch.Tensor
) -> torch.Tensor:
    """The logits of every row of a step: what a FULL CUDA graph captures."""
    return compute_logits(model, tp_layout, forward(*inputs))
