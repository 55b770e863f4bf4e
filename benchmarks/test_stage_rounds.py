"""stage_rounds.pedantic_with_stages keeps the stage timings of the timed rounds, not the warm-up
rounds' that pytest-benchmark runs before them (bench_pipeline's stage table took its batch-16 p50 and
p95 from two timed rounds and the warm-up). Nothing here is timed against anything."""

from __future__ import annotations

from stage_rounds import pedantic_with_stages


def test_stage_timings_of_the_timed_rounds_only(benchmark):
    calls: list[int] = []

    def fn():
        calls.append(len(calls))
        return f"call {calls[-1]}", {"total": float(calls[-1])}

    result, stages = pedantic_with_stages(benchmark, fn, rounds=3, warmup_rounds=2)
    assert result == f"call {calls[-1]}"
    if benchmark.disabled:  # --benchmark-disable: one call, no warm-up
        assert calls == [0] and stages == [{"total": 0.0}]
    else:
        assert len(calls) == 5 and len(benchmark.stats.stats.data) == 3
        assert [s["total"] for s in stages] == [2.0, 3.0, 4.0]
