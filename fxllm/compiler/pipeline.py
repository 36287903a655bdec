"""The compiler as a short pipeline: capture -> passes -> split -> compile pieces.

``compile_model`` returns the engine's forward callable and a CompileReport.
Levels (vLLM's): 0 eager; 1 plain torch.compile of the model; 2 capture once and
the whole graph to the backend; 3 capture once, split at the splitting ops and
compile every compute piece (default).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import fx, nn
from torch.fx.interpreter import Interpreter

from fxllm.compiler.cache import CompileCache, engine_cache_key
from fxllm.compiler.cudagraph import CUDAGraphWrapper
from fxllm.compiler.capture import CapturedGraph, DirectCall, capture, engine_local_forward, mark_num_tokens_dynamic
from fxllm.compiler.piecewise import PieceCompiler, SizeDispatch, find_size_argument, returns_single_value
from fxllm.compiler.report import CompileReport
from fxllm.compiler.split import SplitGraph, split_graph
from fxllm.models.interface import Model
from fxllm.parallel.tp_config import TPLayout
from fxllm.passes.tensor_parallel import TensorParallelPass, placeholder_parameter_names
from fxllm.config import CompilationLevel, CUDAGraphMode, EngineConfig, compile_cache_disabled, fxllm_cache_dir
from fxllm.passes.manager import PassManager

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# T of the start-up trace: any T >= 2 works, since T is marked dynamic.
CAPTURE_NUM_TOKENS = 16


@dataclass
class CompiledModel:
    forward: Forward  # what the runner calls each step
    report: CompileReport
    split: SplitGraph | None = None  # the captured graph as split into pieces (levels 2 and 3), for inspection

    def release_cudagraphs(self) -> None:
        """Drop the pieces' CUDA graphs (see ``CUDAGraphWrapper.release``)."""
        for piece in self.cudagraph_pieces():
            piece.release()

    def cudagraph_pieces(self) -> list[CUDAGraphWrapper]:
        """The compiled pieces wrapped for PIECEWISE CUDA graphs (none unless asked for)."""
        if self.split is None:
            return []
        return [module for module in self.split.graph_module.modules() if isinstance(module, CUDAGraphWrapper)]


def compile_model(
    model: Model,
    config: EngineConfig,
    profile_context: Callable[[], ContextManager[None]],
    tp_layout: TPLayout | None = None,
    piecewise_cudagraphs: bool = False,
) -> CompiledModel:
    """``profile_context`` sets a forward context without attention metadata (attention is skipped).
    ``tp_layout``: this rank's part of a tensor-parallel model (None on one device), whose
    collectives a pass inserts into the captured graph (at level 0 that graph then runs eagerly).
    ``piecewise_cudagraphs``: wrap each compiled piece for PIECEWISE CUDA graphs (level 3)."""
    compilation = config.compilation
    report = CompileReport(level=int(compilation.level))
    if compilation.level == CompilationLevel.NO_COMPILATION and tp_layout is None:
        return CompiledModel(model, report)
    if compilation.level == CompilationLevel.NO_COMPILATION:  # TP: the captured graph, run eagerly
        captured, _ = _capture_with_passes(model, config, profile_context, report, tp_layout)
        return CompiledModel(DirectCall(captured, captured.graph_module), report)
    start = time.perf_counter()
    if compilation.level == CompilationLevel.DYNAMO_AS_IS:
        compiled = CompiledModel(_DynamoAsIs(model, compilation.use_inductor, report), report)
        with profile_context(), torch.inference_mode():
            compiled.forward(*dummy_inputs(model, config, CAPTURE_NUM_TOKENS))
    else:
        compiled = _capture_and_compile(model, config, profile_context, report, tp_layout, piecewise_cudagraphs)
    report.compile_seconds = round(time.perf_counter() - start, 2)
    logger.info(
        "compiled at level %d: %d pieces, %.1f s, %s",
        report.level, report.pieces, report.compile_seconds,
        "loaded from cache" if report.loaded_from_cache else f"{report.inductor_compiles} Inductor compiles",
    )
    return compiled


def dummy_inputs(model: Model, config: EngineConfig, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A step of ``num_tokens`` tokens in the layout the runner passes: input_ids (or their
    embeddings), and positions (for M-RoPE, [3, T] viewed from a [T, 3] buffer: strides (1, 3))."""
    device = config.device
    input_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    positions = torch.arange(num_tokens, device=device) % config.model.max_model_len
    if model.uses_mrope:
        positions = positions[:, None].repeat(1, 3).t()
    if model.takes_inputs_embeds:
        return model.embed_input_ids(input_ids), positions
    return input_ids, positions


class _DynamoAsIs:
    """Level 1: torch.compile of the model, called through Dynamo every step.

    After the first call a recompile is an error (a stance entered around each call,
    never left switched on for the process)."""

    def __init__(self, model: nn.Module, use_inductor: bool, report: CompileReport):
        self.report = report

        def count_compiles(graph_module: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
            report.dynamo_compiles += 1
            if not use_inductor:
                return graph_module.forward
            from torch._inductor.compile_fx import compile_fx

            report.inductor_compiles += 1
            return compile_fx(graph_module, example_inputs)

        self.compiled = torch.compile(engine_local_forward(model), backend=count_compiles, fullgraph=True)

    def __call__(self, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mark_num_tokens_dynamic(inputs, positions)
        stance = torch.compiler.set_stance("fail_on_recompile") if self.report.dynamo_compiles else contextlib.nullcontext()
        with stance:
            return self.compiled(inputs, positions)


def _capture_with_passes(
    model: nn.Module,
    config: EngineConfig,
    profile_context: Callable[[], ContextManager[None]],
    report: CompileReport,
    tp_layout: TPLayout | None,
    dump_dir: Path | None = None,
) -> tuple[CapturedGraph, str]:
    """Capture the model, then run the graph passes: the configured ones at levels 2-3, and
    the tensor-parallel pass for a rank of a TP model. Returns the graph and the passes' uuid."""
    compilation = config.compilation
    start = time.perf_counter()
    with profile_context(), torch.inference_mode(), _depyf_dump(dump_dir):
        captured = capture(model, *dummy_inputs(model, config, CAPTURE_NUM_TOKENS))
    report.dynamo_compiles = 1
    report.dynamo_seconds = round(time.perf_counter() - start, 2)
    passes_uuid = ""
    if compilation.level != CompilationLevel.NO_COMPILATION:
        pass_manager = PassManager(compilation.pass_config)
        report.passes = pass_manager(captured.graph_module)
        passes_uuid = pass_manager.uuid()
    if tp_layout is not None:
        names = placeholder_parameter_names(captured.graph_module.graph, captured.example_inputs, model)
        tp_pass = TensorParallelPass(tp_layout, names)
        report.passes[tp_pass.name] = tp_pass(captured.graph_module.graph)
        captured.graph_module.recompile()
        passes_uuid += tp_pass.uuid()
    return captured, passes_uuid


def _capture_and_compile(
    model: nn.Module,
    config: EngineConfig,
    profile_context: Callable[[], ContextManager[None]],
    report: CompileReport,
    tp_layout: TPLayout | None,
    piecewise_cudagraphs: bool,
) -> CompiledModel:
    compilation = config.compilation
    dump_dir = Path(compilation.debug_dump_path) if compilation.debug_dump_path else None
    captured, passes_uuid = _capture_with_passes(model, config, profile_context, report, tp_layout, dump_dir)

    splitting_ops = compilation.effective_splitting_ops if compilation.level == CompilationLevel.PIECEWISE else ()
    split = split_graph(captured.graph_module, splitting_ops)
    report.pieces = len(split.pieces)
    report.splitting_ops = list(splitting_ops)
    report.piece_ops = [piece.op_histogram for piece in split.pieces]
    if dump_dir is not None:
        _write_split_graph(dump_dir, split)

    if compilation.use_inductor:
        cache = None
        if not compile_cache_disabled():
            root = Path(compilation.cache_dir) if compilation.cache_dir else fxllm_cache_dir() / "compile"
            cache = CompileCache(root, engine_cache_key(config, passes_uuid))
            report.cache_dir = str(cache.directory)
        compiler = PieceCompiler(cache)
        start = time.perf_counter()
        _compile_pieces(model, split, captured, compiler, config, profile_context)
        report.inductor_seconds = round(time.perf_counter() - start, 2)
        report.compiled_shapes = ["dynamic"] + [str(size) for size in compilation.compile_sizes]
        report.inductor_compiles = compiler.inductor_compiles
        report.unique_pieces = len(compiler.artifacts)
        report.loaded_from_cache = compiler.loaded > 0 and compiler.inductor_compiles == 0
    if piecewise_cudagraphs:
        for piece in split.pieces:
            if not piece.is_splitting_op:
                wrapped = CUDAGraphWrapper(getattr(split.graph_module, piece.name), CUDAGraphMode.PIECEWISE)
                setattr(split.graph_module, piece.name, wrapped)
    return CompiledModel(DirectCall(captured, split.graph_module), report, split)


def _compile_pieces(
    model: nn.Module,
    split: SplitGraph,
    captured: CapturedGraph,
    compiler: PieceCompiler,
    config: EngineConfig,
    profile_context: Callable[[], ContextManager[None]],
) -> None:
    """Compile every compute piece for the symbolic T (inputs from fake propagation), then
    for each compile size (inputs from a real dummy step), and install the dispatchers."""
    compute = {piece.name for piece in split.pieces if not piece.is_splitting_op}
    dispatchers: dict[str, SizeDispatch] = {}
    graph_module = split.graph_module

    def compile_dynamic(name: str, module: fx.GraphModule, args: list[Any]) -> None:
        dispatchers[name] = SizeDispatch(
            compiler.compile(module, args, size=None), find_size_argument(args), returns_single_value(module)
        )

    fake_inputs = [_fake_value(node) for node in graph_module.graph.nodes if node.op == "placeholder"]
    fake_mode = torch._guards.detect_fake_mode(fake_inputs)
    with fake_mode, profile_context():
        _PieceVisitor(graph_module, compute, compile_dynamic).run(*fake_inputs)

    for size in config.compilation.compile_sizes:
        def compile_static(name: str, module: fx.GraphModule, args: list[Any], size: int = size) -> None:
            dispatchers[name].by_size[size] = compiler.compile(module, args, size=size)

        inputs = _real_inputs(captured, *dummy_inputs(model, config, size))
        with profile_context(), torch.inference_mode():
            _PieceVisitor(graph_module, compute, compile_static).run(*inputs)

    for name, dispatcher in dispatchers.items():
        setattr(graph_module, name, dispatcher)


def _fake_value(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _real_inputs(captured: CapturedGraph, step_inputs: torch.Tensor, positions: torch.Tensor) -> list[Any]:
    """The captured inputs with the dummy step replaced by a step of ``len(step_inputs)`` tokens."""
    inputs = list(captured.example_inputs)
    inputs[captured.inputs_slot] = step_inputs
    inputs[captured.positions_slot] = positions
    for slot in captured.size_slots:
        inputs[slot] = step_inputs.shape[0]
    return inputs


class _PieceVisitor(Interpreter):
    """Runs the split graph and hands each compute piece, with its actual inputs, to ``on_piece``."""

    def __init__(self, graph_module: fx.GraphModule, compute: set[str], on_piece: Callable[..., None]):
        super().__init__(graph_module)
        self.compute = compute
        self.on_piece = on_piece

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        if target in self.compute:
            self.on_piece(target, self.fetch_attr(target), list(args))
        return super().call_module(target, args, kwargs)


@contextlib.contextmanager
def _depyf_dump(dump_dir: Path | None):
    if dump_dir is None:
        yield
        return
    try:
        import depyf
    except ImportError:
        raise ImportError("debug_dump_path needs depyf: pip install depyf") from None
    dump_dir.mkdir(parents=True, exist_ok=True)
    with depyf.prepare_debug(str(dump_dir)):
        yield


def _write_split_graph(dump_dir: Path, split: SplitGraph) -> None:
    dump_dir.mkdir(parents=True, exist_ok=True)
    (dump_dir / "split_graph.py").write_text(split.graph_module.print_readable(print_output=False))
    for piece in split.pieces:
        (dump_dir / f"piece_{piece.name}.py").write_text(piece.module.print_readable(print_output=False))
