"""Per-stage timings of a pytest-benchmark pedantic run, kept for the timed rounds only."""

from __future__ import annotations

from typing import Any, Callable


def pedantic_with_stages(benchmark: Any, fn: Callable[[], tuple[Any, dict]], rounds: int,
                         warmup_rounds: int = 1) -> tuple[Any, list[dict]]:
    """``benchmark.pedantic`` of ``fn`` (which returns its result and that round's stage timings), one
    call a round; returns the last result and the stage timings of the timed rounds. pedantic calls
    ``fn`` for its warm-up rounds too, and leaves them out of its own statistics: kept, a first call's
    one-time costs were one of the three batch-16 values the stage table took its p50 and p95 from."""
    stages: list[dict] = []

    def one_round() -> Any:
        result, timing = fn()
        stages.append(timing)
        return result

    result = benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    # under --benchmark-disable pedantic calls fn once, with no warm-up
    first = 0 if benchmark.disabled else warmup_rounds
    return result, stages[first:first + rounds]
