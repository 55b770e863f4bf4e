"""The labelling time breakdown (bench_postprocess.label_time_breakdown) run on the CPU under
fake_cuda, so a GPU session does not find a plumbing mistake in it; and its kernel table on made-up
profiler events. Nothing here says anything about GPU timings."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bench_postprocess as bench
from fake_cuda import DEVICE_NAME, fake_cuda


def test_short_kernel_names():
    assert bench.short_kernel_name("void pneumoseg::postprocess::kernels::local_kernel<unsigned char>("
                                   "unsigned char const*, pneumoseg::postprocess::kernels::Geometry)") == "local_kernel"
    assert bench.short_kernel_name("void cub::CUB_300001_SM_900::detail::scan::DeviceScanKernel<cub::X<int>>(int*)"
                                   ) == "DeviceScanKernel"
    assert bench.short_kernel_name("Memcpy DtoH (Device -> Pinned)") == "Memcpy DtoH"
    assert bench.short_kernel_name("resolve_kernel") == "resolve_kernel"


def test_device_time_table_sums_template_instances_per_call():
    def event(key, us, count, device=True):
        return SimpleNamespace(key=key, self_device_time_total=us, count=count, on_device=device)

    events = [event("void ns::local_kernel<float>(float const*)", 500.0, 5),
              event("void ns::local_kernel<unsigned char>(unsigned char const*)", 1000.0, 5),
              event("Memcpy DtoH (Device -> Pinned)", 10.0, 5),
              event("aten::empty", 0.0, 10, device=False),
              event("cudaStreamSynchronize", 7.0, 5, device=False)]
    table = bench.device_time_table(events, 5, lambda e: e.on_device)
    assert table == [{"name": "local_kernel", "device_us_per_call": 300.0, "launches_per_call": 2.0},
                     {"name": "Memcpy DtoH", "device_us_per_call": 2.0, "launches_per_call": 1.0}]


def test_label_time_breakdown_runs_under_fake_cuda(monkeypatch, tmp_path, capsys):
    from torch.profiler import ProfilerActivity

    with fake_cuda(monkeypatch):
        monkeypatch.setattr(bench, "RESULTS", tmp_path)
        masks = torch.from_numpy(np.random.default_rng(0).random((2, 40, 50)) < 0.5).cuda().to(torch.uint8)
        out = bench.label_time_breakdown(torch, masks, calls=2, activities=[ProfilerActivity.CPU])
        bench.write_result("label_breakdown_gpu.json", {"device": torch.cuda.get_device_name(), "inputs": {"x": out}})
    written = json.loads((tmp_path / "label_breakdown_gpu.json").read_text())
    assert written["device"] == DEVICE_NAME
    row = written["inputs"]["x"]
    assert row["components"] > 0 and row["profiled_calls"] == 2
    assert {"warm_pool_ms", "cold_pool_ms", "device_ms_per_call", "host_and_gaps_ms", "kernels",
            "pool_bytes_after_one_call", "scratch_bytes_per_pixel"} <= set(row)
    import gpu_summary  # the session summary reads what the benchmark wrote

    gpu_summary.label_breakdown(written)
    assert "label_components time breakdown" in capsys.readouterr().out
