"""Tensor parallelism at the edges: a terminal's Ctrl-C, a step that fails half-way on rank 0,
and a model that cannot split, all on CPU with gloo."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxllm import LLM, SamplingParams
from fxllm.runtime.runner import ModelRunner
from tests.tiny_models import CONFIGS, save_config_checkpoint

SCRIPT = Path(__file__).with_name("tp_interrupt_script.py")
REPOSITORY = Path(__file__).resolve().parent.parent
MAX_MODEL_LEN = 64
SCRIPT_SECONDS = 600


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_config_checkpoint(CONFIGS["llama"](), tmp_path_factory.mktemp("tp_reliability") / "llama")


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.85])
def test_ctrl_c_in_a_terminal_leaves_the_ranks_in_step(model_dir, fraction):
    """SIGINT reaches rank 0 and its workers alike: the workers ignore it, rank 0 finishes the
    step under way, raises KeyboardInterrupt, and the next call gives the same tokens."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(model_dir), str(fraction)], cwd=REPOSITORY, capture_output=True, text=True,
        timeout=SCRIPT_SECONDS, start_new_session=True,  # its own process group: the signal stays there
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["interrupted"]
    assert report["after"] == report["before"]
    assert report["same_workers"]  # nothing needed restarting


def test_a_step_that_fails_half_way_on_rank_0_restarts_the_workers(model_dir, monkeypatch):
    """Rank 0 sent the step, then failed before its own part: the workers wait in a collective
    rank 0 never joins. The next call starts the ranks afresh and gives the same tokens."""
    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, tensor_parallel_size=2)
    prompts = [{"prompt_token_ids": [5, 17, 42, 99, 3 + i]} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    pids = llm.llm_engine.executor.worker_pids
    calls = {"count": 0}
    real_execute = ModelRunner.execute

    def failing_execute(self, plan, previous=None):
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("rank 0 failed mid-step")
        return real_execute(self, plan, previous)

    monkeypatch.setattr(ModelRunner, "execute", failing_execute)  # rank 0 only: the workers forked before
    with pytest.raises(RuntimeError, match="rank 0 failed mid-step"):
        llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(ModelRunner, "execute", real_execute)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    assert llm.llm_engine.executor.worker_pids != pids


def test_heads_that_do_not_split_are_refused_before_any_worker_starts(model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 cannot split this model: num_attention_heads=4"):
        LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, tensor_parallel_size=3)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("fxllm-tp-")]
    assert not torch.distributed.is_initialized()
