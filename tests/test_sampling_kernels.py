"""The one-pass Triton sampler (sampling_kernels.py): the distribution it draws from, and
the seed contract. Without CUDA it runs under Triton's interpreter on CPU tensors, with
small chunks of the vocabulary so that it stays quick there."""

from __future__ import annotations

import pytest
import torch

# Without CUDA, tests/conftest.py has switched Triton to its interpreter.
from fxllm.runtime.sampling_kernels import draw_seeds, gumbel_max_sample

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CHUNK = 128  # logits per program; the vocabularies below span three chunks
VOCAB = 2 * CHUNK + 44
DRAWS = 600
# Four standard errors of a frequency near 1/2 over DRAWS draws (temperature 1 instead of
# 0.5, or no noise, moves the first frequency by 0.2 or more).
FREQUENCY_TOLERANCE = 0.082


def _sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    return gumbel_max_sample(logits.to(DEVICE), temperature.to(DEVICE), seeds.to(DEVICE), chunk=CHUNK).cpu()


def test_tokens_follow_softmax_of_the_logits_over_temperature():
    """DRAWS copies of one row, one seed each (a row within one chunk: one interpreted
    program per draw)."""
    logits = torch.full((1, CHUNK - 5), -30.0)
    likely = [5, 60, CHUNK - 6]
    logits[0, likely] = torch.tensor([2.0, 1.0, 0.0])
    temperature = 0.5
    expected = torch.softmax(logits[0, likely] / temperature, dim=0)
    default = torch.Generator(device=DEVICE).manual_seed(0)
    seeds = draw_seeds(DRAWS, [None] * DRAWS, default, DEVICE)
    tokens = _sample(logits.expand(DRAWS, -1), torch.full((DRAWS,), temperature), seeds)
    assert set(tokens.tolist()) <= set(likely)
    observed = torch.tensor([(tokens == token).float().mean().item() for token in likely])
    assert torch.allclose(observed, expected, atol=FREQUENCY_TOLERANCE), (observed, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_of_one_possible_token_always_gives_it(dtype):
    """Rows whose token sits in the first, second and last chunk: the best chunk is found."""
    logits = torch.full((3, VOCAB), float("-inf"))
    logits[torch.arange(3), torch.tensor([0, CHUNK + 1, VOCAB - 1])] = 0.0
    tokens = _sample(logits.to(dtype), torch.ones(3), torch.tensor([1, 2, 3]))
    assert tokens.tolist() == [0, CHUNK + 1, VOCAB - 1] and tokens.dtype == torch.int64


def test_a_seeded_row_draws_the_same_tokens_wherever_it_sits_in_the_batch():
    """A request with its own generator: its row's noise comes from its seed alone, so its
    tokens do not depend on its row or on the other rows' draws."""
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)).expand(4, -1)
    temperature = torch.full((4,), 2.0)  # flat enough that draws differ from step to step

    def tokens_of_seeded_row(row: int, default_seed: int) -> list[int]:
        generators: list[torch.Generator | None] = [None] * 4
        generators[row] = torch.Generator(device=DEVICE).manual_seed(1234)
        default = torch.Generator(device=DEVICE).manual_seed(default_seed)
        return [_sample(logits, temperature, draw_seeds(4, generators, default, DEVICE))[row].item() for _ in range(8)]

    first = tokens_of_seeded_row(0, default_seed=0)
    assert tokens_of_seeded_row(3, default_seed=99) == first
    assert len(set(first)) > 1
