// Connected components and post-processing (csrc/postprocess: label_cpu, postprocess_cpu) on
// fuzzer-chosen masks and probability maps of every dtype and layout, thresholds included NaN, +-inf,
// denormals and values just past float's range, against a breadth-first flood fill written here:
// labels in raster order of each component's first pixel, areas, the area filter, the triplet rule,
// gating and the per-image component counts. Big mode (N = 1, >= 2^16 pixels) takes the striped,
// multi-threaded labelling and its seam joins.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <deque>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "postprocess/components.h"

namespace pp = pneumoseg::postprocess;
using pneumoseg::DType;

namespace {

// Labels 1..K in raster order of first pixel; areas[k - 1].
void ref_label(const std::vector<uint8_t>& fg, int64_t H, int64_t W, int connectivity, std::vector<int32_t>& lab,
               std::vector<int64_t>& areas) {
  lab.assign(H * W, 0);
  areas.clear();
  std::deque<int64_t> queue;
  for (int64_t i = 0; i < H * W; ++i) {
    if (!fg[i] || lab[i]) continue;
    areas.push_back(0);
    const auto id = static_cast<int32_t>(areas.size());
    lab[i] = id;
    queue.push_back(i);
    while (!queue.empty()) {
      const int64_t p = queue.front();
      queue.pop_front();
      ++areas.back();
      const int64_t r = p / W, c = p % W;
      for (int64_t dr = -1; dr <= 1; ++dr) {
        for (int64_t dc = -1; dc <= 1; ++dc) {
          if ((dr == 0 && dc == 0) || (connectivity == 4 && dr != 0 && dc != 0)) continue;
          const int64_t rr = r + dr, cc = c + dc;
          if (rr < 0 || rr >= H || cc < 0 || cc >= W) continue;
          const int64_t q = rr * W + cc;
          if (fg[q] && !lab[q]) {
            lab[q] = id;
            queue.push_back(q);
          }
        }
      }
    }
  }
}

bool ref_foreground(const uint8_t* buf, DType t, int64_t i, bool use_threshold, double threshold) {
  if (!use_threshold) return fuzz::element_nonzero(buf, t, i);
  return fuzz::element_value(buf, t, i) > threshold;  // NaN on either side: background
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider fdp(data, size);
  const uint8_t mode = fdp.ConsumeIntegral<uint8_t>();
  const bool big = mode == 0xff;  // rare: a big image costs a hundred small ones
  const auto dtype = static_cast<DType>(fdp.ConsumeIntegralInRange<int>(0, static_cast<int>(DType::Float64)));
  const int64_t N = big ? 1 : fdp.ConsumeIntegralInRange<int64_t>(0, 3);
  const int64_t H = big ? fdp.ConsumeIntegralInRange<int64_t>(256, 270) : fdp.ConsumeIntegralInRange<int64_t>(0, 20);
  const int64_t W = big ? fdp.ConsumeIntegralInRange<int64_t>(256, 258) : fdp.ConsumeIntegralInRange<int64_t>(0, 20);
  const int layout_code = fdp.ConsumeIntegralInRange<int>(0, 5);
  const int64_t pad = fdp.ConsumeIntegralInRange<int64_t>(0, 3);
  const uint8_t conn_pick = fdp.ConsumeIntegral<uint8_t>();
  const int connectivity = conn_pick < 120 ? 4 : conn_pick < 250 ? 8 : fdp.ConsumeIntegral<int>();

  pp::Foreground fg;
  fg.use_threshold = fdp.ConsumeBool();
  fg.threshold = fuzz::special_double(fdp.ConsumeIntegral<uint8_t>() % 32, fdp.ConsumeIntegral<uint64_t>());
  pp::PostprocessParams params;
  params.mask = fg;
  params.connectivity = connectivity;
  params.use_triplet = fdp.ConsumeBool();
  params.triplet_top = fuzz::special_double(fdp.ConsumeIntegral<uint8_t>() % 32, fdp.ConsumeIntegral<uint64_t>());
  params.triplet_min_area = fdp.ConsumeBool() ? fdp.ConsumeIntegral<int64_t>() : fdp.ConsumeIntegralInRange<int64_t>(-1, 30);
  params.min_component_area =
      fdp.ConsumeBool() ? fdp.ConsumeIntegral<int64_t>() : fdp.ConsumeIntegralInRange<int64_t>(-1, 30);
  const bool want_components = fdp.ConsumeBool();
  const bool wrong_keep_size = fdp.ConsumeIntegral<uint8_t>() == 0;
  std::vector<uint8_t> keep(N + (wrong_keep_size ? 1 : 0));
  for (auto& k : keep) k = fdp.ConsumeIntegralInRange<uint8_t>(0, 3) != 0 ? 1 : 0;

  const fuzz::Layout l = fuzz::make_layout(N, H, W, layout_code, pad);
  const int64_t esize = pneumoseg::dtype_size(dtype);
  fuzz::Block buf(static_cast<size_t>(l.extent * esize));
  const std::vector<uint8_t> bytes = fdp.ConsumeRemainingBytes<uint8_t>();
  for (size_t i = 0; i < buf.size; ++i) buf.data[i] = bytes.empty() ? 0 : bytes[i % bytes.size()];
  const auto input = fuzz::view3(buf.data + l.origin * esize, dtype, N, H, W, l);
  const fuzz::Layout cl = fuzz::make_layout(N, H, W, 0, 0);
  const bool bad_connectivity = connectivity != 4 && connectivity != 8;

  // --- label_cpu ---
  fuzz::Block labels(static_cast<size_t>(N * H * W * 4));
  const auto labels_view = fuzz::view3(labels.data, DType::Int32, N, H, W, cl);
  std::vector<std::vector<int64_t>> areas;
  const bool label_refused =
      fuzz::rejects("label_cpu", [&] { pp::label_cpu(input, fg, connectivity, labels_view, areas); });
  FUZZ_CHECK(label_refused == bad_connectivity, "label_cpu refused=" + std::to_string(label_refused) +
                                                    " with connectivity " + std::to_string(connectivity));
  std::vector<std::vector<uint8_t>> fg_ref(N, std::vector<uint8_t>(H * W));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < H; ++r)
      for (int64_t c = 0; c < W; ++c)
        fg_ref[n][r * W + c] = ref_foreground(buf.data, dtype, fuzz::offset(l, n, r, c), fg.use_threshold, fg.threshold);
  if (!label_refused) {
    FUZZ_CHECK(areas.size() == static_cast<size_t>(N), "one area list per image");
    for (int64_t n = 0; n < N; ++n) {
      std::vector<int32_t> lab;
      std::vector<int64_t> ref_areas;
      ref_label(fg_ref[n], H, W, connectivity, lab, ref_areas);
      FUZZ_CHECK(areas[n] == ref_areas, "areas of image " + std::to_string(n) + ": " + std::to_string(areas[n].size()) +
                                            " components, reference " + std::to_string(ref_areas.size()));
      for (int64_t i = 0; i < H * W; ++i) {
        int32_t got;
        std::memcpy(&got, labels.data + (n * H * W + i) * 4, 4);
        FUZZ_CHECK(got == lab[i], "label of pixel " + std::to_string(i) + " = " + std::to_string(got) +
                                      ", reference " + std::to_string(lab[i]));
      }
    }
  }

  // --- postprocess_cpu ---
  fuzz::Block out(static_cast<size_t>(N * H * W));
  std::memset(out.data, 0xA5, out.size);
  fuzz::Block components(static_cast<size_t>(N * 4));
  std::memset(components.data, 0xA5, components.size);
  const auto out_view = fuzz::view3(out.data, DType::UInt8, N, H, W, cl);
  std::vector<uint8_t> nonempty;
  int32_t* comp = want_components ? reinterpret_cast<int32_t*>(components.data) : nullptr;
  const bool pp_refused =
      fuzz::rejects("postprocess_cpu", [&] { nonempty = pp::postprocess_cpu(input, params, keep, out_view, comp); });
  FUZZ_CHECK(pp_refused == (bad_connectivity || wrong_keep_size), "postprocess_cpu refused=" + std::to_string(pp_refused));
  if (pp_refused) return 0;
  FUZZ_CHECK(nonempty.size() == static_cast<size_t>(N), "one flag per image");
  const int64_t min_area = want_components ? std::max<int64_t>(1, params.min_component_area) : params.min_component_area;
  for (int64_t n = 0; n < N; ++n) {
    bool kept = keep[n] != 0;
    if (kept && params.use_triplet) {
      int64_t above = 0;
      for (int64_t r = 0; r < H; ++r)
        for (int64_t c = 0; c < W; ++c)
          above += ref_foreground(buf.data, dtype, fuzz::offset(l, n, r, c), true, params.triplet_top);
      kept = above >= params.triplet_min_area;
    }
    std::vector<uint8_t> expect(H * W, 0);
    int32_t expect_components = 0;
    if (kept) {
      std::vector<int32_t> lab;
      std::vector<int64_t> ref_areas;
      ref_label(fg_ref[n], H, W, params.connectivity, lab, ref_areas);
      for (int64_t i = 0; i < H * W; ++i) expect[i] = lab[i] && ref_areas[lab[i] - 1] >= min_area;
      for (int64_t a : ref_areas) expect_components += a >= min_area;
    }
    bool any = false;
    for (int64_t i = 0; i < H * W; ++i) {
      any |= expect[i] != 0;
      FUZZ_CHECK(out.data[n * H * W + i] == expect[i], "postprocess pixel " + std::to_string(i) + " of image " +
                                                           std::to_string(n) + " = " + std::to_string(out.data[n * H * W + i]));
    }
    FUZZ_CHECK(nonempty[n] == any, "nonempty flag of image " + std::to_string(n));
    if (want_components) {
      int32_t got;
      std::memcpy(&got, components.data + n * 4, 4);
      FUZZ_CHECK(got == expect_components, "components of image " + std::to_string(n) + " = " + std::to_string(got) +
                                               ", reference " + std::to_string(expect_components));
    }
  }
  return 0;
}
