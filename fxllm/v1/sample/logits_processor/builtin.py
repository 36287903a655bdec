"""Helpers for processors that keep a state per batch index (vLLM's ``builtin`` module path)."""

from __future__ import annotations

from typing import Callable, TypeVar

from fxllm.sampling_params import SamplingParams
from fxllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality

State = TypeVar("State")


def process_dict_updates(
    states: dict[int, State],
    batch_update: BatchUpdate | None,
    new_state: Callable[[SamplingParams, "list[int] | None", "list[int]"], "State | None"],
) -> bool:
    """Bring ``states`` (batch index -> a request's state) up to ``batch_update``. ``new_state``
    gives an added request's state, or None where the processor does not apply to it.
    Returns whether anything changed."""
    if not batch_update:
        return False
    changed = False
    for index, params, prompt_ids, output_ids in batch_update.added:
        state = new_state(params, prompt_ids, output_ids)
        if state is not None:
            states[index] = state
            changed = True
        elif states.pop(index, None) is not None:
            changed = True  # the index's former request had a state; the new one has none
    if not states:
        return changed
    for index in batch_update.removed:
        changed |= states.pop(index, None) is not None
    for source, target, how in batch_update.moved:
        moving, displaced = states.pop(source, None), states.pop(target, None)
        if moving is not None:
            states[target] = moving
        if displaced is not None and how is MoveDirectionality.SWAP:
            states[source] = displaced
        changed |= moving is not None or displaced is not None
    return changed
