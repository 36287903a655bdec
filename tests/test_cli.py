"""The ``fxllm`` command: inspect writes every file, generate prints text, bench runs the scripts.

The CLI runs in-process through ``main([...])`` (no interpreter start-up per call); the bench
subcommands start their script in a subprocess themselves, so their output is read with capfd.
"""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ElementTree
from contextlib import redirect_stdout
from pathlib import Path

import networkx as nx
import pytest

from fxllm import LLM, SamplingParams
from fxllm import cli
from fxllm.inspection import COMPUTE_STYLE, SPLITTING_STYLE, export_graph

TINY_MAX_MODEL_LEN = 64
INSPECT_FILES = ("report.json", "report.md", "graph.graphml", "pieces.graphml", "graph.svg")
SVG_NAMESPACE = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def inspected(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One ``fxllm inspect`` at level 3 (the only compile in this file): (output folder, stdout)."""
    root = tmp_path_factory.mktemp("inspect")
    out = root / "out"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(stdout):
        patch.setenv("FXLLM_CACHE_DIR", str(root / "cache"))  # keep artifacts out of the user's cache
        status = cli.main(["inspect", str(llama_dir), "--out", str(out), "--max-model-len", str(TINY_MAX_MODEL_LEN)])
    assert status == 0
    return out, stdout.getvalue()


@pytest.fixture
def one_thread_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two OpenMP threads on a 2-core machine that is also running other work can slow a tiny
    # model's steps 30-fold; one thread keeps the bench smoke runs at a few seconds.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_inspect_writes_every_file(inspected):
    out, _ = inspected
    for name in INSPECT_FILES:
        assert (out / name).stat().st_size > 0, name
    assert any((out / "depyf").rglob("*.py")), "the depyf dump is empty"


def test_inspect_prints_the_summary(inspected):
    out, stdout = inspected
    report = json.loads((out / "report.json").read_text())
    assert f"pieces: {report['pieces']}" in stdout
    assert str(out / "graph.svg") in stdout


def test_op_graph_has_one_piece_value_per_piece_of_the_report(inspected):
    out, _ = inspected
    report = json.loads((out / "report.json").read_text())
    ops = nx.read_graphml(out / "graph.graphml")
    assert len({piece for _, piece in ops.nodes(data="piece")}) == report["pieces"]
    assert ops.number_of_edges() > ops.number_of_nodes() // 2
    pieces = nx.read_graphml(out / "pieces.graphml")
    assert pieces.number_of_nodes() == report["pieces"]
    assert nx.is_weakly_connected(pieces)


def test_attention_output_reaches_the_next_piece(inspected):
    """The op writes ``out`` in place: the graph must show the next piece depends on it."""
    out, _ = inspected
    pieces = nx.read_graphml(out / "pieces.graphml")
    for name, splitting in pieces.nodes(data="is_splitting_op"):
        if splitting:
            assert any(kind == "mutation" for _, _, kind in pieces.out_edges(name, data="kind")), name


def test_svg_is_xml_and_draws_attention_pieces_differently(inspected):
    out, _ = inspected
    report = json.loads((out / "report.json").read_text())
    root = ElementTree.parse(out / "graph.svg").getroot()
    assert root.tag == f"{SVG_NAMESPACE}svg"
    boxes = [rect for rect in root.iter(f"{SVG_NAMESPACE}rect") if "piece" in rect.get("class", "")]
    splitting = [box for box in boxes if "splitting" in box.get("class")]
    attention_pieces = sum(1 for ops in report["piece_ops"] if "fxllm.attention" in ops)
    assert len(boxes) == report["pieces"]
    assert len(splitting) == attention_pieces == 2  # the tiny Llama has 2 layers
    assert {box.get("fill") for box in splitting} == {SPLITTING_STYLE[0].split('"')[1]}
    assert {box.get("fill") for box in boxes if box not in splitting} == {COMPUTE_STYLE[0].split('"')[1]}


def test_report_md_lists_every_piece_and_the_cache(inspected):
    out, _ = inspected
    report = json.loads((out / "report.json").read_text())
    text = (out / "report.md").read_text()
    for index in range(report["pieces"]):
        assert f"| submod_{index} |" in text
    assert "compile cache: miss" in text or "compile cache: hit" in text


def test_export_graph_of_an_eager_engine_says_to_use_level_2_or_3(llama_dir, tmp_path):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=TINY_MAX_MODEL_LEN)
    with pytest.raises(ValueError, match="use level 2 or 3"):
        export_graph(llm, tmp_path)


def test_generate_prints_each_prompts_completion(llama_dir, capsys):
    prompts = ["The capital of France is", "Hello"]
    status = cli.main([
        "generate", str(llama_dir), "--prompt", prompts[0], "--prompt", prompts[1], "--temperature", "0",
        "--max-tokens", "4", "--enforce-eager", "--max-model-len", str(TINY_MAX_MODEL_LEN),
    ])
    printed = capsys.readouterr().out
    assert status == 0
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=TINY_MAX_MODEL_LEN)
    expected = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    for prompt, output in zip(prompts, expected):
        assert output.outputs[0].text
        assert f"--- prompt: {prompt}\n{output.outputs[0].text}\n" in printed


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["generate", "/no/such/model", "--prompt", "hi"], "does not exist"),
        (["generate", "{llama}", "--prompt", "hi", "--max-tokens", "0", "--enforce-eager"], "max_tokens"),
        (["generate", "{llama}", "--prompt", "hi", "--chat", "--enforce-eager"], "chat template"),
        (["inspect", "/no/such/model"], "does not exist"),
    ],
)
def test_user_errors_exit_2_with_the_engine_message_and_no_traceback(llama_dir, capsys, arguments, message):
    arguments = [arg.replace("{llama}", str(llama_dir)) for arg in arguments]
    status = cli.main([*arguments, "--max-model-len", str(TINY_MAX_MODEL_LEN)])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("arguments", [["generate", "--prompt", "x", "--temperature", "hot"], ["inspect", "--level", "1"], ["bench", "speed"]])
def test_bad_options_are_argparse_errors(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(arguments)
    assert exit_info.value.code == 2
    assert "usage: fxllm" in capsys.readouterr().err


def _bench(tmp_path: Path, capfd, *arguments: str) -> tuple[object, str]:
    """``fxllm bench ARGUMENTS --json FILE``: the JSON it wrote and what it printed."""
    result_path = tmp_path / "bench.json"
    status = cli.main(["bench", *arguments, "--json", str(result_path)])
    assert status == 0, capfd.readouterr().err[-2000:]
    return json.loads(result_path.read_text()), capfd.readouterr().out


def test_bench_latency_runs_on_a_tiny_shape(tmp_path, capfd, one_thread_subprocesses):
    (result,), out = _bench(tmp_path, capfd, "latency", "--shape", "tiny", "--new-tokens", "8", "--repeats", "1", "--enforce-eager")
    assert "decode tok/s" in out
    assert result["tok_s"] > 0 and result["bytes_per_step"]["total"] > result["bytes_per_step"]["lm_head"]


def test_bench_moe_runs_on_a_tiny_shape(tmp_path, capfd, one_thread_subprocesses):
    result, out = _bench(
        tmp_path, capfd, "moe", "kernel", "decode", "throughput", "--shape", "tiny-moe", "--device", "cpu",
        "--enforce-eager", "--rows", "1", "4", "--new-tokens", "8", "--repeats", "1", "--num-requests", "2",
        "--input-len", "8", "16", "--output-len", "4", "8", "--quantization", "fp8",
    )
    assert [row["tokens"] for row in result["kernel"]] == [1, 4] and all(row["torch_us"] > 0 for row in result["kernel"])
    decode = result["decode"]
    assert decode["decode_tok_s"] > 0 and decode["bytes_per_step"]["active_experts"] > 0
    assert decode["bound_tok_s"] > 0 and "batch-1 decode" in out
    assert result["throughput"]["requests"] == 2 and "workload T" in out


def test_bench_startup_runs_on_a_tiny_shape_with_its_breakdown(tmp_path, capfd, one_thread_subprocesses):
    result, out = _bench(
        tmp_path, capfd, "startup", "--shape", "tiny", "--levels", "0", "--max-model-len", "64", "--decode-tokens", "4",
        "--device", "cpu", "--cprofile", "5",
    )
    assert "startup_s" in out and "cumulative seconds under cProfile" in out
    (row,) = result["rows"]
    assert row["startup_s"] > 0 and row["load_s"] > 0 and row["decode_tok_s"] > 0
    accounted = row["load_s"] + row["compile_s"] + row["capture_s"] + row["memory_profile_s"]
    assert row["other_s"] == pytest.approx(row["startup_s"] - accounted, abs=0.02)
    profiled = row["cprofile_cumulative_s"]
    assert len(profiled) == 5 and any(name.startswith("llm.py:") for name in profiled)


def test_bench_throughput_runs_on_a_tiny_shape_with_the_hf_comparator(tmp_path, capfd, one_thread_subprocesses):
    result, out = _bench(
        tmp_path, capfd, "throughput", "--shape", "tiny", "--num-requests", "4", "--input-len", "8", "32",
        "--output-len", "4", "12", "--enforce-eager", "--hf-compare", "2", "--profile-steps", "2", "--profile-after", "1",
        "--step-log", "--compare-torch-sampler",
    )
    assert "output tok/s" in out
    assert result["fxllm"]["requests"] == 4 and result["fxllm"]["output_tok_s"] > 0
    assert result["fxllm_same_as_hf"]["output_tokens"] == result["hf"]["useful_tokens"]
    profile = result["profile"]
    assert profile["steps"] == 2 and profile["wall_ms_per_step"] > 0
    assert "aten::mm" in profile["top_kernels_ms_per_step"]  # on a CPU the profiler's "kernels" are operators
    steps = result["steps"]
    assert steps["all"]["steps"] == steps["with_prompt_tokens"]["steps"] + steps["decode_only"]["steps"]
    # Every output token but each request's first (sampled by its prompt's last step) is a decode's.
    assert steps["decode_only"]["tokens"] + steps["with_prompt_tokens"]["tokens"] == (
        result["fxllm"]["prompt_tokens"] + result["fxllm"]["output_tokens"] - result["fxllm"]["requests"])
    assert steps["decode_only"]["kv_gb_per_s"] > 0 and "decodes, batch" in out
    assert result["fxllm_torch_sampler"]["output_tokens"] == result["fxllm"]["output_tokens"]
    assert "torch sampling path" in out


def test_bench_decode_settings_checks_each_setting_against_the_default(tmp_path, capfd):
    """Under the interpreter: every setting's output matches the default setting's (fp32);
    nothing is timed. The default (64 keys, 4 warps, 3 stages, 8 per SM) is among them."""
    rows, out = _bench(
        tmp_path, capfd, "decode_settings", "--device", "cpu", "--batch-sizes", "3", "--contexts", "8", "80",
        "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "16", "--tile-keys", "16", "64", "--warps", "4",
        "--stages", "3", "--programs-per-sm", "8", "64",
    )
    assert [(row["tile_keys"], row["programs_per_sm"]) for row in rows] == [(16, 8), (16, 64), (64, 8), (64, 64)]
    assert sum(row["default"] for row in rows) == 1 and "(default)" in out
    assert all(row["max_abs_error"] < 1e-5 and row["us"] is None for row in rows)
    assert len({row["splits"] for row in rows}) > 1  # the programs-per-SM target changes the split count


def test_bench_outside_a_source_checkout_says_where_the_scripts_are(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_tools_dir", lambda: tmp_path)
    assert cli.main(["bench", "startup"]) == 2
    assert "source repository" in capsys.readouterr().err


def test_throughput_workload_is_the_one_of_benchmarks_md(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    import bench_throughput

    workload = bench_throughput.make_workload(256, (100, 1024), (100, 1024))
    assert sum(map(len, workload.prompts)) == 142_827
    assert sum(workload.max_tokens) == 133_966


def test_bench_kernels_runs_on_a_tiny_shape(tmp_path, capfd, one_thread_subprocesses):
    result, out = _bench(tmp_path, capfd, "kernels", "--shape", "tiny", "--device", "cpu", "--no-inductor", "--steps", "2")
    assert "kernels/layer" in out
    rows = result["rows"]
    assert set(rows) == {"inductor alone", "no-op elimination", "every pass"}
    assert all(row["kernels_per_step"] > 0 for row in rows.values())


def test_bench_step_sync_times_the_tensor_parallel_step_message(tmp_path, capfd):
    rows, _ = _bench(tmp_path, capfd, "step_sync", "--batch-sizes", "1", "4", "--steps", "5")
    assert [row["batch_size"] for row in rows] == [1, 4]
    assert all(row["send_us_mean"] > 0 for row in rows)


def test_bench_host_step_times_each_phase_of_a_step(tmp_path, capfd, one_thread_subprocesses):
    rows, out = _bench(tmp_path, capfd, "host_step", "--device", "cpu", "--batch-sizes", "1", "4", "--async-scheduling", "on")
    assert "host total" in out
    assert [row["batch_size"] for row in rows] == [1, 4]
    for row in rows:
        phases = row["ms_per_step"]
        assert row["async_scheduling"] and row["steps"] > 0
        assert phases["device work"] > 0 and phases["schedule"] > 0 and phases["inputs"] > 0 and phases["wait for tokens"] > 0
        host = sum(value for phase, value in phases.items() if phase not in ("device work", "wait for tokens", "host total", "step"))
        assert phases["host total"] == pytest.approx(host, abs=0.01)
        assert phases["step"] == pytest.approx(host + phases["device work"] + phases["wait for tokens"], abs=0.01)


def test_bench_vision_times_the_tower_eager_and_compiled(tmp_path, capfd, one_thread_subprocesses):
    result, out = _bench(
        tmp_path, capfd, "vision", "--device", "cpu", "--archs", "qwen2_5_vl", "--depth", "2", "--sides", "56", "--repeats", "1",
    )
    row = [line for line in out.splitlines() if line.startswith("qwen2_5_vl")]
    assert len(row) == 1 and row[0].endswith("x")
    assert [r["side"] for r in result["rows"]] == [56]
