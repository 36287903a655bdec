"""Per-kernel times from the torch profiler, as the benchmark tools list them."""

from __future__ import annotations

PROFILER_STEP_MARK = "ProfilerStep"  # the profiler's record of each scheduled step, not a kernel
NAME_WIDTH = 110  # kernel names are long templates: the start tells them apart


def kernel_ms(profiler, on_gpu: bool, per: int = 1) -> dict[str, float]:
    """Each kernel's self time in ms over the profile (on a CPU: each operator's), divided by
    ``per``; kernels that took no time are left out."""
    attribute = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    times = {
        event.key: getattr(event, attribute) / 1e3 / per
        for event in profiler.key_averages()
        if not event.key.startswith(PROFILER_STEP_MARK)
    }
    return {name: ms for name, ms in times.items() if ms > 0}


def top_kernels(per_kernel: dict[str, float], count: int) -> dict[str, float]:
    """The ``count`` costliest, costliest first, rounded for a table."""
    ranked = sorted(per_kernel.items(), key=lambda item: -item[1])[:count]
    return {name: round(ms, 4) for name, ms in ranked}


def print_kernels(title: str, kernels: dict[str, float]) -> None:
    print(f"\n{title}")
    for name, ms in kernels.items():
        print(f"  {ms:>9.4f}  {name[:NAME_WIDTH]}")
