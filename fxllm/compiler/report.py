"""What the compiler did, for users and tests: ``LLM.compile_report()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class CompileReport:
    level: int
    dynamo_compiles: int = 0  # Dynamo traces of the model (1 after start-up, whatever T runs)
    pieces: int = 0  # submodules in the split graph (compute pieces + splitting-op pieces)
    splitting_ops: list[str] = field(default_factory=list)
    piece_ops: list[dict[str, int]] = field(default_factory=list)  # op histogram per piece
    compiled_shapes: list[str] = field(default_factory=list)  # "dynamic" and each compile size
    cudagraph_mode: str = "NONE"  # as resolved for this engine (CUDA only)
    cudagraph_sizes: dict[str, list[int]] = field(default_factory=dict)  # "FULL"/"PIECEWISE" -> sizes captured
    cudagraph_capture_seconds: float = 0.0
    cudagraph_memory_bytes: int = 0  # device memory the graph pool took
    passes: dict[str, int] = field(default_factory=dict)  # pass name -> matches
    compile_seconds: float = 0.0  # Dynamo + passes + split + Inductor
    dynamo_seconds: float = 0.0  # capturing the graph
    inductor_seconds: float = 0.0  # compiling (or loading) the pieces
    load_seconds: float = 0.0  # building the model and reading its weights (before compiling)
    memory_profile_seconds: float = 0.0  # the forward at the full token budget that sizes the KV cache (GPU)
    weight_bytes: int = 0  # parameters and buffers of the model on this device (this rank's shard under TP)
    inductor_compiles: int = 0  # pieces compiled by Inductor (not loaded, not de-duplicated)
    unique_pieces: int = 0  # distinct compiled artifacts after de-duplicating identical layers
    cache_dir: str | None = None
    loaded_from_cache: bool = False
    # Under tensor parallelism on GPUs: all-reduces up to this many bytes take the one-shot
    # kernel over peer memory, larger ones NCCL (0: NCCL for every size).
    one_shot_all_reduce_bytes: int = 0
    mm_encoder_compiled: bool = False  # the vision tower's regions compiled (compile_mm_encoder)

    def to_dict(self) -> dict:
        return asdict(self)
