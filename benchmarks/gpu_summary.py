"""Key figures of the GPU benchmark JSON files (benchmarks/results/*gpu*.json) against the issues'
targets (11: kernels; 8: models; 9: training; 10: pipeline), as a few short tables. Missing files are named, never an error.

    python benchmarks/gpu_summary.py [benchmarks/results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(folder: Path, name: str):
    path = folder / name
    if not path.is_file():
        print(f"{name}: missing")
        return None
    return json.loads(path.read_text())


def _mark(ok: bool) -> str:
    return "ok" if ok else "BELOW TARGET"


def loss(data: dict) -> None:
    print(f"loss fwd+bwd, weights {data['weights']} ({data['device']}); targets: >=5x eager, >=1.5x compile, <=2x floor at 16x1024")
    print(f"  {'shape':8} {'dtype':9} {'fused ms':>9} {'eager ms':>9} {'compile ms':>10} {'x eager':>8} {'x compile':>9} {'x floor':>8}")
    for r in data["results"]:
        ok = r["speedup_vs_eager"] >= 5 and r["speedup_vs_compile"] >= 1.5
        if r["shape"] == "16x1024":
            ok = ok and r["fused_over_floor"] <= 2
        print(f"  {r['shape']:8} {r['dtype']:9} {r['fused_s'] * 1e3:9.3f} {r['eager_s'] * 1e3:9.3f} {r['compiled_s'] * 1e3:10.3f} "
              f"{r['speedup_vs_eager']:8.2f} {r['speedup_vs_compile']:9.2f} {r['fused_over_floor']:8.1f}  {_mark(ok)}")
        graphed = r.get("graphed_s")
        if graphed:  # device time alone, from CUDA graph replay
            shown = ", ".join(f"{k} {'-' if v is None else f'{v * 1e3:.3f} ms'}" for k, v in graphed.items())
            over = r.get("fused_graphed_over_floor")
            print(f"      graph replay: {shown}" + ("" if over is None else f"; fused {over:.1f}x the floor"))
        for name, why in (r.get("graph_errors") or {}).items():
            print(f"      {name} could not be captured: {why[:150]}")


def batch64(data: dict, title: str) -> None:
    print(f"{title}, batch {data['batch']} x {data['shape']} ({data['device']}); target >=10x the cupyx loop")
    for inp, r in data["inputs"].items():
        print(f"  {inp:10} pneumoseg {r['pneumoseg_ms']:8.2f} ms ({r['pneumoseg_images_per_second']:8.0f} img/s)  "
              f"cupyx loop {r['cupyx_loop_ms']:8.2f} ms  speed-up {r['speedup_vs_cupyx']:6.1f}x  {_mark(r['speedup_vs_cupyx'] >= 10)}")


def batch1(data: dict) -> None:
    ms = data["postprocess_and_rle_median_ms"]
    print(f"postprocess + RLE of one 1024x1024 logit map ({data['device']}), median of {data['reps']}: {ms:.3f} ms "
          f"(target < {data['target_ms']} ms: {_mark(ms < data['target_ms'])}); postprocess alone "
          f"{data['postprocess_only_median_ms']:.3f} ms, encode alone {data['encode_only_median_ms']:.3f} ms")


def rle(data: dict) -> None:
    print(f"rle.encode_batch, {data['batch']} masks ({data['device']}): {data['encode_batch_seconds'] * 1e3:.3f} ms, "
          f"{data['masks_per_second']:.0f} masks/s, {data['encode_over_copy']:.2f}x one D2H copy of the masks, "
          f"CPU same host {data['cpu_encode_batch_seconds_same_host'] * 1e3:.1f} ms")


def models(data: dict) -> None:
    print(f"segmenters {data['size']}x{data['size']} batch {data['batch']}, {data['dtype']} + {data['memory_format']} "
          f"({data['device']}), images/s; ours / timm + plain decoder:")
    for r in data["results"]:
        if "error" in r:
            print(f"  {r['arch']:7} {r['encoder']:20} {r['impl']:22} ERROR {r['error'][:120]}")
    ratios = data["speedup_vs_timm_plain"]
    for r in data["results"]:
        if r["impl"] == "pneumoseg" and "images_per_s" in r:
            ratio = ratios.get(f"{r['encoder']} {r['arch']} {r['mode']}")
            print(f"  {r['arch']:7} {r['encoder']:20} {r['mode']:17} {r['images_per_s']:9.1f}"
                  + ("" if ratio is None else f"   x timm {ratio:5.2f}"))
    for key, ratio in data.get("subpixel_speedup", {}).items():  # sub-pixel decoder blocks / the reference formulation
        print(f"  sub-pixel decoder speed-up {key}: {ratio:.2f}x")
    if data.get("not_run_over_budget"):
        print(f"  not run (over the {data['budget_s']:.0f} s budget): {', '.join(data['not_run_over_budget'])}")


def train(data: dict) -> None:
    print(f"training images/s ({data['device']}); target: pneumoseg >= 1.5x the plain loop")
    for r in data["results"]:
        print(f"  {r['images_per_s']:9.1f}  {r['impl']}")
    print(f"  speed-up {data['speedup']:.2f}x  {_mark(data['speedup'] >= 1.5)}")


def pipeline(data: dict) -> None:
    print(f"pipeline, radiographs {data['original']}x{data['original']} on the GPU -> RLE, {data['precision']} "
          f"({data['device']}); targets: batch 1 <= 3 ms and >= 7x eager, >= 1000 images/s at batch {data['pool']}")
    for config, row in data.items():
        if not isinstance(row, dict) or "eager_fp32_networks_ms" not in row:
            continue
        print(f"  {config}: eager fp32 networks {row['eager_fp32_networks_ms']:.2f} ms")
        for backend, r in row.items():
            if not isinstance(r, dict):
                continue
            ok = all(r["targets"].values())
            print(f"    {backend:9} batch 1 all {r['batch1_all_p50_ms']:6.2f} ms (p95 {r['batch1_all_p95_ms']:.2f}), "
                  f"gated walk {r['batch1_gated_walk_p50_ms']:6.2f} ms, x eager {r['speedup_vs_eager_fp32']:5.1f}, "
                  f"batch {data['pool']} {r['batch_images_per_second']:7.0f} img/s ({r['batch_gated_in']} gated in)  {_mark(ok)}")
            if "batch1_all_networks_in_series_p50_ms" in r:
                print(f"    {'':9} batch 1 all with the networks in series: {r['batch1_all_networks_in_series_p50_ms']:6.2f} ms")


def label_breakdown(data: dict) -> None:
    print(f"label_components time breakdown, batch {data.get('batch', '?')} x {data.get('shape', '?')} ({data['device']}):")
    for inp, r in data["inputs"].items():
        print(f"  {inp:10} warm pool {r['warm_pool_ms']:.2f} ms, cold pool {r['cold_pool_ms']:.2f} ms, device "
              f"{r['device_ms_per_call']:.2f} ms, host + gaps {r['host_and_gaps_ms']:.2f} ms, pool holds "
              f"{r['pool_bytes_after_one_call'] / 2**20:.0f} MiB")
        for k in r["kernels"][:6]:
            print(f"      {k['device_us_per_call']:9.1f} us  x{k['launches_per_call']:.0f}  {k['name'][:80]}")


# Each results file and the section that prints it.
SECTIONS = {
    "loss_gpu.json": loss,
    "label_gpu.json": lambda data: batch64(data, "label_components"),
    "label_breakdown_gpu.json": label_breakdown,
    "postprocess_gpu.json": lambda data: batch64(data, "fused postprocess (threshold + label + area filter)"),
    "postprocess_rle_batch1_gpu.json": batch1,
    "rle_gpu.json": rle,
    "models_gpu.json": models,
    "train_gpu.json": train,
    "pipeline_gpu.json": pipeline,
}


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    for name, section in SECTIONS.items():
        data = _load(folder, name)
        if not data:
            continue
        try:
            section(data)
        except (KeyError, TypeError, ValueError) as exc:  # a file from an older benchmark layout
            print(f"  (could not read: {exc!r})")
    others = sorted(p.name for p in folder.glob("*gpu*.json") if p.name not in SECTIONS)
    if others:
        print("other GPU results:", ", ".join(others))


if __name__ == "__main__":
    main()
