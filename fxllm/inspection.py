"""See what the compiler did: ``export_graph(llm, out_dir)`` writes the report and the graphs as files.

    from fxllm import LLM
    from fxllm.inspection import export_graph

    files = export_graph(LLM(model="/path/to/model"), "inspect")   # then open inspect/graph.svg

Files written (the CLI's ``fxllm inspect`` calls this):
- ``report.json``    the CompileReport, field for field
- ``report.md``      a human summary: pieces and their ops, passes, compile time, cache use
- ``graph.graphml``  one node per op of every piece (attribute ``piece``), data-flow edges
- ``pieces.graphml`` one node per piece, edges where a piece uses another's results
- ``graph.svg``      a picture of the piece-level graph; splitting-op (attention) pieces in orange
"""

from __future__ import annotations

import json
import operator
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from xml.sax.saxutils import escape

import networkx as nx
import torch
from torch import fx

from fxllm.compiler.report import CompileReport
from fxllm.compiler.split import Piece, SplitGraph, op_name
from fxllm.config import CompilationLevel

if TYPE_CHECKING:
    from fxllm.llm import LLM

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
OP_GRAPH = "graph.graphml"
PIECE_GRAPH = "pieces.graphml"
PIECE_SVG = "graph.svg"

DATA_EDGE = "data"
# A splitting op writes into a buffer (attention's ``out``) that a later piece reads: FX sees
# no edge from the op to the reader, so we add one, or the picture would hide the dependency.
MUTATION_EDGE = "mutation"
TOP_OPS_SHOWN = 4  # ops per piece named in the SVG box


def export_graph(llm: LLM, out_dir: str | Path) -> dict[str, str | int]:
    """Write the compile report and the captured graph of ``llm`` into ``out_dir``.

    Returns the paths of the files written (keys: report_json, report_md, graph, pieces_graph,
    svg) and the sizes of the op graph (pieces, ops, edges)."""
    runner = llm.llm_engine.runner
    compiled = runner.compiled
    report = compiled.report
    if compiled.split is None:
        level = CompilationLevel(report.level)
        raise ValueError(
            f"this engine was built at compilation level {int(level)} ({level.name}), which captures no "
            "graph to export: use level 2 or 3, i.e. build it with compilation_config=3 (piecewise, the "
            "default) or 2 (one whole graph), and without enforce_eager=True"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ops = op_graph(compiled.split)
    pieces = piece_graph(compiled.split, ops)
    model = llm.llm_engine_config.model.model

    paths = {
        "report_json": out / REPORT_JSON,
        "report_md": out / REPORT_MD,
        "graph": out / OP_GRAPH,
        "pieces_graph": out / PIECE_GRAPH,
        "svg": out / PIECE_SVG,
    }
    paths["report_json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    paths["report_md"].write_text(report_markdown(report, model, compiled.split))
    nx.write_graphml(ops, paths["graph"])
    nx.write_graphml(pieces, paths["pieces_graph"])
    paths["svg"].write_text(piece_graph_svg(pieces))
    return {
        **{key: str(path) for key, path in paths.items()},
        "pieces": pieces.number_of_nodes(),
        "ops": ops.number_of_nodes(),
        "edges": ops.number_of_edges(),
    }


# ---- the op-level graph ------------------------------------------------------------------


def op_graph(split: SplitGraph) -> nx.DiGraph:
    """One node per op of every piece (id ``piece.node``), edges along data flow, across pieces too."""
    graph = nx.DiGraph()
    for index, piece in enumerate(split.pieces):
        for node in _ops(piece.module):
            graph.add_node(
                _op_id(piece.name, node), piece=piece.name, piece_index=index, op=op_name(node),
                name=node.name, is_splitting_op=piece.is_splitting_op,
            )
    flow = _SplitFlow(split)
    for piece in split.pieces:
        for node in _ops(piece.module):
            for source in node.all_input_nodes:
                for producer in flow.producers_inside(piece.name, source):
                    graph.add_edge(producer, _op_id(piece.name, node), kind=DATA_EDGE)
    for writer, reader in flow.mutation_edges():
        if not graph.has_edge(writer, reader):
            graph.add_edge(writer, reader, kind=MUTATION_EDGE)
    return graph


def _ops(module: fx.GraphModule) -> Iterator[fx.Node]:
    return (node for node in module.graph.nodes if node.op not in ("placeholder", "output"))


def _op_id(piece_name: str, node: fx.Node) -> str:
    return f"{piece_name}.{node.name}"


class _SplitFlow:
    """Follows values through the split graph: a piece's inputs are its placeholders, bound in
    order to the arguments of its ``call_module`` node in the split graph."""

    def __init__(self, split: SplitGraph):
        self.pieces = {piece.name: piece for piece in split.pieces}
        self.call_sites = [node for node in split.graph_module.graph.nodes if node.op == "call_module"]
        self.site_of = {node.target: node for node in self.call_sites}

    def bound_argument(self, piece_name: str, placeholder: fx.Node) -> object:
        placeholders = [n for n in self.pieces[piece_name].module.graph.nodes if n.op == "placeholder"]
        return self.site_of[piece_name].args[placeholders.index(placeholder)]

    def producers_inside(self, piece_name: str, node: fx.Node) -> list[str]:
        """The ops producing ``node`` of piece ``piece_name`` (a placeholder is looked up outside)."""
        if node.op != "placeholder":
            return [_op_id(piece_name, node)]
        return self.producers_of_value(self.bound_argument(piece_name, node))

    def producers_of_value(self, value: object) -> list[str]:
        """The ops producing a value of the split graph; none for the graph's own inputs."""
        if not isinstance(value, fx.Node):
            return []
        if value.op == "call_module":
            piece_name, returned = value.target, self._returned(value.target)
        elif value.op == "call_function" and value.target is operator.getitem and value.args[0].op == "call_module":
            piece_name = value.args[0].target
            returned = self._returned(piece_name)[value.args[1]]
        else:
            return []  # an input of the whole graph (weights, input ids, sizes)
        nodes = returned if isinstance(returned, (tuple, list)) else [returned]
        return [op for node in nodes if isinstance(node, fx.Node) for op in self.producers_inside(piece_name, node)]

    def _returned(self, piece_name: str) -> object:
        output = next(n for n in self.pieces[piece_name].module.graph.nodes if n.op == "output")
        return output.args[0]

    def mutation_edges(self) -> Iterator[tuple[str, str]]:
        """(writer op, reader op) for every later read of a buffer that a splitting op writes."""
        for position, site in enumerate(self.call_sites):
            piece = self.pieces[site.target]
            if not piece.is_splitting_op:
                continue
            for writer, placeholder in _written_placeholders(piece):
                buffer = self.bound_argument(piece.name, placeholder)
                for later in self.call_sites[position + 1:]:
                    yield from self._readers(later, buffer, _op_id(piece.name, writer))

    def _readers(self, site: fx.Node, buffer: object, writer_id: str) -> Iterator[tuple[str, str]]:
        placeholders = [n for n in self.pieces[site.target].module.graph.nodes if n.op == "placeholder"]
        for argument, placeholder in zip(site.args, placeholders):
            if argument is buffer:
                for user in placeholder.users:
                    if user.op != "output":
                        yield writer_id, _op_id(site.target, user)


def _written_placeholders(piece: Piece) -> Iterator[tuple[fx.Node, fx.Node]]:
    """(op, placeholder) for each piece input that an op declares it mutates (schema alias_info)."""
    for node in _ops(piece.module):
        target = node.target
        if isinstance(target, torch._ops.OpOverloadPacket):
            target = target.default
        if not isinstance(target, torch._ops.OpOverload):
            continue
        for argument, value in zip(target._schema.arguments, node.args):
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and isinstance(value, fx.Node) and value.op == "placeholder":
                yield node, value


# ---- the piece-level graph ---------------------------------------------------------------


def piece_graph(split: SplitGraph, ops: nx.DiGraph) -> nx.DiGraph:
    """One node per piece in execution order; an edge where a piece's op uses another piece's op."""
    graph = nx.DiGraph()
    for index, piece in enumerate(split.pieces):
        graph.add_node(
            piece.name, index=index, is_splitting_op=piece.is_splitting_op,
            num_ops=sum(piece.op_histogram.values()), label=_piece_label(piece),
            top_ops=_top_ops(piece.op_histogram, TOP_OPS_SHOWN), op_histogram=json.dumps(piece.op_histogram),
        )
    for source, target, kind in ops.edges(data="kind"):
        source_piece, target_piece = ops.nodes[source]["piece"], ops.nodes[target]["piece"]
        if source_piece == target_piece:
            continue
        if graph.has_edge(source_piece, target_piece):
            edge = graph.edges[source_piece, target_piece]
            edge["values"] += 1
            if kind == DATA_EDGE:  # data wins: the edge is drawn solid if any value flows directly
                edge["kind"] = DATA_EDGE
        else:
            graph.add_edge(source_piece, target_piece, kind=kind, values=1)
    return graph


def _piece_label(piece: Piece) -> str:
    if piece.is_splitting_op:
        return f"{piece.name}: {', '.join(piece.op_histogram)}"
    return f"{piece.name}: compute, {sum(piece.op_histogram.values())} ops"


def _top_ops(histogram: dict[str, int], count: int) -> str:
    return "  ".join(f"{name}×{n}" for name, n in Counter(histogram).most_common(count))


# ---- report.md ---------------------------------------------------------------------------


def summary_lines(report: CompileReport, model: str) -> list[str]:
    """The few facts a reader wants first; shared by report.md and ``fxllm inspect``."""
    level = CompilationLevel(report.level)
    splitting = sum(1 for ops in report.piece_ops if any(op in report.splitting_ops for op in ops))
    return [
        f"model: {model}",
        f"compilation level: {int(level)} ({level.name}); Dynamo compiles: {report.dynamo_compiles}",
        f"pieces: {report.pieces} ({report.pieces - splitting} compute, {splitting} at splitting ops "
        f"{', '.join(report.splitting_ops) or '(none)'}); distinct compiled artifacts: {report.unique_pieces}",
        f"compile time: {report.compile_seconds} s; Inductor compiles: {report.inductor_compiles}",
        f"compiled shapes: {', '.join(report.compiled_shapes) or '(none: pieces run eagerly)'}",
        f"CUDA graphs: {_cudagraph_status(report)}",
        f"compile cache: {_cache_status(report)}",
    ]


def _cudagraph_status(report: CompileReport) -> str:
    if not report.cudagraph_sizes:
        return f"none (mode {report.cudagraph_mode})"
    sizes = "; ".join(f"{mode} at {_size_ranges(sizes)}" for mode, sizes in report.cudagraph_sizes.items())
    return (
        f"mode {report.cudagraph_mode}: {sizes}; captured in {report.cudagraph_capture_seconds} s, "
        f"{report.cudagraph_memory_bytes / 2**20:.0f} MiB"
    )


def _size_ranges(sizes: list[int]) -> str:
    if len(sizes) <= 4:
        return ", ".join(map(str, sizes))
    return f"{len(sizes)} sizes {sizes[0]}..{sizes[-1]}"


def _cache_status(report: CompileReport) -> str:
    if report.cache_dir is None:
        return "not used (use_inductor=False or FXLLM_DISABLE_COMPILE_CACHE=1)"
    if report.loaded_from_cache:
        return f"hit: every piece loaded from {report.cache_dir}"
    return f"miss: {report.inductor_compiles} pieces compiled and stored in {report.cache_dir}"


def report_markdown(report: CompileReport, model: str, split: SplitGraph) -> str:
    lines = ["# fxllm compile report", ""]
    lines += [f"- {line}" for line in summary_lines(report, model)]
    lines += ["", "## Passes", ""]
    if report.passes:
        lines += ["| pass | matches |", "| --- | --- |"]
        lines += [f"| {name} | {matches} |" for name, matches in report.passes.items()]
    else:
        lines.append("No graph pass ran.")
    lines += ["", "## Pieces", "", "In execution order; splitting-op pieces run eagerly between the compiled ones.", ""]
    lines += ["| piece | kind | ops | op histogram |", "| --- | --- | --- | --- |"]
    for piece in split.pieces:
        kind = "splitting op" if piece.is_splitting_op else "compute"
        histogram = ", ".join(f"{name} ×{n}" for name, n in Counter(piece.op_histogram).most_common())
        lines.append(f"| {piece.name} | {kind} | {sum(piece.op_histogram.values())} | {histogram} |")
    return "\n".join(lines) + "\n"


# ---- graph.svg: boxes in a column, no graphviz needed -------------------------------------

BOX_WIDTH, BOX_HEIGHT, BOX_GAP, MARGIN = 420, 46, 30, 20
LEGEND_HEIGHT = 40
ARC_STEP = 14  # how far right each longer skip edge bulges, so arcs of different spans separate
COMPUTE_STYLE = ('fill="#dbe8f7"', 'stroke="#3b6ea8"')
SPLITTING_STYLE = ('fill="#fde0c5"', 'stroke="#e07b00"')


def piece_graph_svg(pieces: nx.DiGraph) -> str:
    order = sorted(pieces.nodes, key=lambda name: pieces.nodes[name]["index"])
    row = {name: index for index, name in enumerate(order)}
    max_span = max((row[t] - row[s] for s, t in pieces.edges), default=1)
    width = MARGIN * 2 + BOX_WIDTH + ARC_STEP * (max_span + 2)
    height = MARGIN * 2 + LEGEND_HEIGHT + len(order) * (BOX_HEIGHT + BOX_GAP)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#444"/></marker></defs>',
        *_legend(),
    ]
    for name in order:
        parts += _box(pieces.nodes[name], _top(row[name]))
    for source, target, kind in pieces.edges(data="kind"):
        parts.append(_arrow(row[source], row[target], kind))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _top(row: int) -> int:
    return MARGIN + LEGEND_HEIGHT + row * (BOX_HEIGHT + BOX_GAP)


def _legend() -> list[str]:
    y = MARGIN
    return [
        f'<rect x="{MARGIN}" y="{y}" width="14" height="14" {" ".join(COMPUTE_STYLE)}/>',
        f'<text x="{MARGIN + 20}" y="{y + 12}">compute piece</text>',
        f'<rect x="{MARGIN + 150}" y="{y}" width="14" height="14" rx="4" {" ".join(SPLITTING_STYLE)}/>',
        f'<text x="{MARGIN + 170}" y="{y + 12}">splitting op (attention), eager</text>',
        f'<text x="{MARGIN}" y="{y + 30}" fill="#666">solid: data, dashed: buffer written by the op</text>',
    ]


def _box(attributes: dict, top: int) -> list[str]:
    splitting = attributes["is_splitting_op"]
    fill, stroke = SPLITTING_STYLE if splitting else COMPUTE_STYLE
    shape = 'class="piece splitting" rx="12"' if splitting else 'class="piece compute"'
    return [
        f'<rect {shape} x="{MARGIN}" y="{top}" width="{BOX_WIDTH}" height="{BOX_HEIGHT}" {fill} {stroke} stroke-width="2"/>',
        f'<text x="{MARGIN + 10}" y="{top + 19}" font-weight="bold">{escape(attributes["label"])}</text>',
        f'<text x="{MARGIN + 10}" y="{top + 36}" fill="#333">{escape(attributes["top_ops"])}</text>',
    ]


def _arrow(source_row: int, target_row: int, kind: str) -> str:
    dash = ' stroke-dasharray="5,3"' if kind == MUTATION_EDGE else ""
    style = f'fill="none" stroke="#444" stroke-width="1.5"{dash} marker-end="url(#arrow)"'
    if target_row == source_row + 1:  # neighbours: straight down
        x = MARGIN + BOX_WIDTH // 2
        return f'<path d="M {x} {_top(source_row) + BOX_HEIGHT} L {x} {_top(target_row)}" {style}/>'
    # Longer edges arc out to the right of the column, farther for longer spans.
    right = MARGIN + BOX_WIDTH
    bulge = right + ARC_STEP * (target_row - source_row + 1)
    y_from = _top(source_row) + BOX_HEIGHT // 2
    y_to = _top(target_row) + BOX_HEIGHT // 2
    return f'<path d="M {right} {y_from} C {bulge} {y_from}, {bulge} {y_to}, {right} {y_to}" {style}/>'
