"""``LoRARequest``: which adapter a request runs with (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name, a positive integer id unique to it, and the directory of its
    PEFT files. fxllm does not run adapters yet: a request that names one is refused."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
