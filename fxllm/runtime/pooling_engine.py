"""The engine of a pooling model: whole prompts through the pooling runner, batch by batch."""

from __future__ import annotations

from typing import Any

import torch

from fxllm.compiler import CompileReport
from fxllm.config import EngineConfig
from fxllm.runtime.engine import UseTqdm, progress_bar
from fxllm.runtime.pooling_runner import PoolingRunner


class PoolingEngine:
    """No KV cache, scheduler or sampler: each batch of prompts is one forward, then pooled."""

    def __init__(self, config: EngineConfig, tokenizer: Any):
        self.config = config
        self.tokenizer = tokenizer
        self.runner = PoolingRunner(config)

    @property
    def compile_report(self) -> CompileReport:
        return self.runner.compile_report

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def pool(self, token_lists: list[list[int]], use_tqdm: UseTqdm = True) -> list[torch.Tensor]:
        """The pooled vector of each prompt, in input order (float32, on the host)."""
        vectors: list[torch.Tensor] = []
        progress = progress_bar(use_tqdm, len(token_lists))
        try:
            for batch in self.runner.plan_batches([len(token_ids) for token_ids in token_lists]):
                vectors.extend(self.runner.execute([token_lists[i] for i in batch]).unbind(0))
                if progress is not None:
                    progress.update(len(batch))
        finally:
            if progress is not None:
                progress.close()
        return vectors
