"""Custom logits processors: vLLM's batch-level ones (``LLM(logits_processors=[...])``) and
vLLM 0.11's per-request callables (``SamplingParams(logits_processors=[fn])``).

A batch-level processor indexes a persistent batch: a request keeps its index from
step to step, a new one takes the lowest index a finished one left, and the last
requests move down into the holes that remain (vLLM's rules). fxllm builds each
step's batch afresh, in scheduling order, so ``ProcessorBatch`` keeps those indices,
derives each step's ``BatchUpdate``, and hands the processors the step's logits in
index order (a gather, skipped while the two orders agree). A request's rows are its
sampling rows: a request whose prompt is still being computed joins the batch at the
step that samples its first token.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fxllm.runtime.request import Request
from fxllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality


def load_logits_processor_classes(entries: tuple) -> tuple[type[LogitsProcessor], ...]:
    """The classes of ``LLM(logits_processors=...)``: classes, or qualified names
    ("package.module.ClassName" or "package.module:ClassName")."""
    classes = []
    for index, entry in enumerate(entries):
        cls = _import_class(entry, index) if isinstance(entry, str) else entry
        if not (isinstance(cls, type) and issubclass(cls, LogitsProcessor)):
            raise TypeError(
                f"logits_processors[{index}] must be a subclass of fxllm.v1.sample.logits_processor.LogitsProcessor "
                f"(or its qualified name), got {entry!r}; per-request callables go in SamplingParams(logits_processors=...)"
            )
        classes.append(cls)
    return tuple(classes)


def _import_class(name: str, index: int) -> Any:
    module_name, _, attribute = name.partition(":") if ":" in name else name.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"logits_processors[{index}]={name!r} is not a qualified class name like 'package.module.ClassName'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"logits_processors[{index}]={name!r} could not be loaded: {error}") from error
    return target


def validate_request_params(classes: tuple[type[LogitsProcessor], ...], params: Any, index: int) -> None:
    """Each processor's ``validate_params`` on a request's params, naming its prompt on failure."""
    for cls in classes:
        try:
            cls.validate_params(params)
        except ValueError as error:
            raise ValueError(f"sampling params of prompt {index}: {cls.__name__} refuses them: {error}") from error


class ProcessorBatch:
    """The engine's batch-level processors and the persistent batch they index."""

    def __init__(self, processors: list[LogitsProcessor], device: torch.device):
        self.device = device
        self.argmax_invariant = [p for p in processors if p.is_argmax_invariant()]
        self.others = [p for p in processors if not p.is_argmax_invariant()]
        self._slots: list[Request | None] = []  # batch index -> request
        self._slot_of: dict[Request, int] = {}

    def step(self, requests: list[Request]) -> "ProcessorStep":
        """Tell every processor how the batch changed for this step's sampling ``requests``."""
        update = self._update(requests)
        for processor in (*self.others, *self.argmax_invariant):
            processor.update_state(update)
        slots = [self._slot_of[request] for request in requests]  # step row -> batch index
        if slots == list(range(len(slots))):
            return ProcessorStep(self, None, None)
        to_batch = torch.empty(len(slots), dtype=torch.long)
        to_batch[torch.tensor(slots)] = torch.arange(len(slots))  # batch index -> step row
        return ProcessorStep(self, to_batch.to(self.device), torch.tensor(slots).to(self.device))

    def _update(self, requests: list[Request]) -> BatchUpdate | None:
        present = set(requests)
        holes = []
        for slot, request in enumerate(self._slots):
            if request is not None and request not in present:
                del self._slot_of[request]
                self._slots[slot] = None
                holes.append(slot)
        removed = list(holes)
        added = []
        for request in requests:
            if request in self._slot_of:
                continue
            if holes:
                slot = holes.pop(0)
                removed.remove(slot)  # taken by the new request: not reported as left
            else:
                slot = len(self._slots)
                self._slots.append(None)
            self._slots[slot], self._slot_of[request] = request, slot
            params = request.sampling_params
            added.append((slot, params, request.prompt_token_ids, request.output_token_ids))
        moved = []
        for hole in holes:  # the last requests move down into the holes left
            while self._slots and self._slots[-1] is None:
                self._slots.pop()
            last = len(self._slots) - 1
            if last <= hole:
                break
            request = self._slots.pop()
            self._slots[hole], self._slot_of[request] = request, hole
            moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        if not (removed or added or moved):
            return None
        return BatchUpdate(batch_size=len(requests), removed=removed, added=added, moved=moved)


@dataclass
class ProcessorStep:
    """One step's processors; the gathers between step rows and batch indices when they differ."""

    batch: ProcessorBatch
    to_batch: torch.Tensor | None  # [B] the step row at each batch index
    to_rows: torch.Tensor | None  # [B] the batch index of each step row

    @property
    def has_argmax_invariant(self) -> bool:
        return bool(self.batch.argmax_invariant)

    @property
    def changes_argmax(self) -> bool:
        return bool(self.batch.others)

    def apply(self, logits: torch.Tensor, argmax_invariant: bool) -> torch.Tensor:
        """``logits`` [B, V] (step rows) through the processors of one kind."""
        processors = self.batch.argmax_invariant if argmax_invariant else self.batch.others
        if not processors:
            return logits
        if self.to_batch is not None:
            logits = logits[self.to_batch]
        for processor in processors:
            logits = processor.apply(logits)
        return logits if self.to_rows is None else logits[self.to_rows]


def apply_request_processors(logits: torch.Tensor, requests: list[Request]) -> None:
    """vLLM 0.11's per-request processors, on each row that has them, in place."""
    for row, request in enumerate(requests):
        for processor in request.sampling_params.logits_processors or ():
            row_logits = logits[row]
            args = (request.output_token_ids, row_logits)
            if _takes_prompt(processor):
                args = (request.prompt_token_ids, *args)
            processed = processor(*args)
            if processed is not row_logits:
                logits[row] = processed


def _takes_prompt(processor: Callable[..., Any]) -> bool:
    """(prompt_ids, output_ids, logits) rather than (output_ids, logits)."""
    return len(inspect.signature(processor).parameters) == 3
