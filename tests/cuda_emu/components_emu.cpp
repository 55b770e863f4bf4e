// Runs the CUDA labelling and post-processing kernels (csrc/postprocess/components_kernels.cuh) on the
// CPU through cuda_emu.h, with the launch sequences of label_cuda and postprocess_cuda
// (components_cuda.cu; keep the two in step), for tests/test_cuda_kernels_emulated.py.
//
//   components_emu IN OUT
// IN: int64 header [mode (0 label, 1 postprocess), n, h, w, connectivity, use_triplet, triplet_min,
// min_component_area, want_components, use_keep], float64 [threshold, top], then n uint8 keep flags
// and n*h*w float32 values. OUT: label: int32 labels, int64 per-image counts, int64 areas;
// postprocess: uint8 masks, int32 per-image component counts.
#include "cuda_emu.h"
// clang-format off: the emulation must come first
#include "postprocess/components_kernels.cuh"
// clang-format on

#include <algorithm>
#include <fstream>
#include <memory>
#include <numeric>

using namespace pneumoseg::postprocess;
using namespace pneumoseg::postprocess::kernels;

namespace {

template <typename T>
void write(std::ofstream& out, const std::vector<T>& v) {
  emu::write(out, v.data(), v.size());
}

// As components_cuda.cu's, but at most 3 blocks per image: the flat kernels stride over the image, so
// this runs the same code (several blocks, each looping) at a fraction of the emulation's cost.
dim3 flat_grid_2d(const Geometry& g) {
  const int64_t per_image = std::max<int64_t>(1, std::min<int64_t>((g.hw() + kThreads - 1) / kThreads, 3));
  return dim3(static_cast<unsigned>(per_image), static_cast<unsigned>(std::min<int64_t>(g.n, kMaxGridZ)));
}

// components_cuda.cu's grid for one thread per image.
unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, 65535)));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: components_emu IN OUT\n");
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  int64_t head[10];
  double thresholds[2];
  emu::read(in, head, 10);
  emu::read(in, thresholds, 2);
  const auto [mode, n, h, w, connectivity, use_triplet, triplet_min, min_area, want_components, use_keep] = head;
  std::vector<uint8_t> keep(n);
  emu::read(in, keep.data(), keep.size());
  const int64_t total = n * h * w;
  std::vector<float> values(total);
  emu::read(in, values.data(), values.size());
  std::ofstream out(argv[2], std::ios::binary);

  const Geometry g{n, static_cast<int32_t>(h), static_cast<int32_t>(w), h * w, w, 1};
  const dim3 tiles = tile_grid(g), block(kTile, kRowsPerPass), flat = flat_grid_2d(g);
  const int conn = static_cast<int>(connectivity);
  std::vector<int32_t> parent(total, 123456789), area(total, 123456789);  // garbage, as fresh device memory
  const IsForeground<float> fg{true, thresholds[0]}, top{true, thresholds[1]};

  if (mode == 0) {  // label_cuda: root flags, then ranks, live in the labels output until the last pass
    std::vector<int32_t> labels(total, 987654321), per_image(n, -5);  // garbage, as a fresh torch.empty
    emu::launch(tiles, block, [&] {
      local_kernel<float>(values.data(), g, fg, nullptr, conn, parent.data(), area.data(), IsForeground<float>{true, 0.0},
                          nullptr);
    });
    emu::launch(tiles, block, [&] { border_kernel(g, conn, parent.data()); });
    emu::launch(flat, dim3(kThreads), [&] { resolve_kernel(g, parent.data(), area.data(), labels.data()); });
    std::exclusive_scan(labels.begin(), labels.end(), labels.begin(), 0);  // CUB's in-place ExclusiveSum
    emu::launch(dim3(grid_for(n)), dim3(kThreads), [&] {
      image_counts_kernel(g, parent.data(), labels.data(), per_image.data());
    });
    std::vector<int64_t> counts(per_image.begin(), per_image.end());  // the copy to the host
    int64_t k_total = 0;
    for (int64_t c : counts) {
      if (c < 0) {
        std::fprintf(stderr, "components_emu: negative component count\n");
        return 1;
      }
      k_total += c;
    }
    // allocate_areas(k_total): exactly k_total values, so ASan catches a write past them.
    auto areas = std::make_unique<int64_t[]>(static_cast<size_t>(std::max<int64_t>(k_total, 1)));
    if (k_total > 0) {
      emu::launch(flat, dim3(kThreads), [&] {
        compact_areas_kernel(g, parent.data(), labels.data(), area.data(), areas.get());
      });
    }
    emu::launch(flat, dim3(kThreads), [&] { write_labels_kernel(g, parent.data(), area.data(), labels.data()); });
    write(out, labels);
    write(out, counts);
    write(out, std::vector<int64_t>(areas.get(), areas.get() + k_total));
    return 0;
  }

  // postprocess_cuda
  const bool components = min_area > 0 || want_components;
  std::vector<int32_t> counts(n, 0), kept_components(n, 0);
  std::vector<uint8_t> masks(total, 7);
  emu::launch(tiles, block, [&] {
    local_kernel<float>(values.data(), g, fg, use_keep ? keep.data() : nullptr, conn, parent.data(), area.data(), top,
                        use_triplet ? counts.data() : nullptr);
  });
  if (components) {
    emu::launch(tiles, block, [&] { border_kernel(g, conn, parent.data()); });
    emu::launch(flat, dim3(kThreads), [&] { resolve_kernel(g, parent.data(), area.data(), nullptr); });
  }
  emu::launch(flat, dim3(kThreads), [&] {
    write_mask_kernel(g, parent.data(), area.data(), min_area > 0 ? min_area : 0, use_triplet ? counts.data() : nullptr,
                      triplet_min, masks.data(), want_components ? kept_components.data() : nullptr);
  });
  write(out, masks);
  write(out, kept_components);
  return 0;
}
