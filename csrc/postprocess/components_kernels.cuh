#pragma once
// CUDA connected components: union-find with atomicMin (Playne & Hawick, "A new algorithm for
// parallel connected-component labelling on GPUs", 2018), done in two levels as in block-based
// union-find (Allegretti et al., 2019):
//   1. local: each block labels one 32x32 tile in shared memory, one warp per tile row: pixels start
//      at their row run's first pixel, runs unite with the runs above by the run rule (run_unions),
//      and writes, per pixel, the image-local raster index of its tile root, areas at the roots;
//   2. border: tiles unite with their neighbours in global memory (run rule on each top row);
//   3. resolve: each tile root finds its final root, points at it and adds its area there.
// Unions keep the smaller index, so every root is its component's first pixel in raster order, and
// a prefix sum of root flags numbers the components 1..K in scipy's order. Kernels index pixels by
// a 3-D grid (column tile, row tile, image) in 32-bit arithmetic. Nothing synchronises with the host
// except label_cuda's copy of the per-image component counts; the areas stay on the device.
// label_cuda needs only two int32 scratch arrays of the batch's size (parent, area): the root flags
// and their ranks live in its labels output until the last pass overwrites them with the labels.
//
// The kernels and their device helpers, without host code, so that the CUDA translation unit
// (components_cuda.cu) and the CPU emulation of the kernels in tests/cuda_emu/ compile the same source.
#include <cstdint>

#include "common/macros.h"
#include "common/warp.cuh"
#include "postprocess/foreground.h"

namespace pneumoseg::postprocess::kernels {

constexpr int kTile = 32;                         // tile side: one warp per tile row
constexpr int kRowsPerPass = 8;                   // block = kTile x kRowsPerPass threads
constexpr int kTileThreads = kTile * kRowsPerPass;
constexpr int kRowsPerThread = kTile / kRowsPerPass;
constexpr int kThreads = 256;                     // flat kernels
constexpr int kMaxGridZ = 65535;

struct Geometry {
  int64_t n;
  int32_t h, w;
  int64_t sn, sh, sw;
  PNEUMOSEG_HD int64_t hw() const { return int64_t(h) * w; }
};

// The tile kernels' grid: one block per 32x32 tile, images along z (more loop in the kernels).
inline dim3 tile_grid(const Geometry& g) {
  const int64_t images = g.n < kMaxGridZ ? g.n : kMaxGridZ;
  return dim3(static_cast<unsigned>((g.w + kTile - 1) / kTile), static_cast<unsigned>((g.h + kTile - 1) / kTile),
              static_cast<unsigned>(images));
}

// Reads go through volatile pointers: other threads re-point parents while we walk.
__device__ __forceinline__ int32_t find_root(const volatile int32_t* parent, int32_t x) {
  int32_t p = parent[x];
  while (p != x) {
    x = p;
    p = parent[x];
  }
  return x;
}

// find_root with path halving: each visited node is re-pointed at its grandparent, an ancestor, so
// the store is safe while other threads walk or link (roots only ever gain a parent). Used while
// pass 2 links tile roots, where the many tile roots of a large or noisy component form long chains.
// The store is an atomicMin: parents only ever decrease (every link points at the smaller index), so
// it never undoes a newer, lower parent another thread wrote, and racecheck sees no plain shared-memory
// store racing the other threads' walks (it reported 352 hazards on an H200 with a plain store).
__device__ __forceinline__ int32_t find_root_halving(int32_t* parent, int32_t x) {
  volatile int32_t* p = parent;
  int32_t up = p[x];
  while (up != x) {
    const int32_t grand = p[up];
    if (grand == up) return up;
    atomicMin(parent + x, grand);
    x = grand;
    up = p[x];
  }
  return x;
}

template <bool kHalving>
__device__ __forceinline__ void unite(int32_t* parent, int32_t a, int32_t b) {
  while (true) {
    a = kHalving ? find_root_halving(parent, a) : find_root(parent, a);
    b = kHalving ? find_root_halving(parent, b) : find_root(parent, b);
    if (a == b) return;
    if (a > b) {
      const int32_t t = a;
      a = b;
      b = t;
    }
    const int32_t old = atomicMin(&parent[b], a);  // b's root becomes a, unless someone got there first
    if (old == b) return;
    b = old;
  }
}

// Bit helpers over one tile row held as a 32-bit mask (bit tx = column tx is foreground).
__device__ __forceinline__ bool bit(unsigned bits, int i) { return i >= 0 && i < 32 && ((bits >> i) & 1u); }

// First column of the run of set bits that contains column tx (tx's bit must be set).
__device__ __forceinline__ int run_start_of(unsigned bits, int tx) {
  const unsigned zeros_below = ~bits & ((1u << tx) - 1u);
  return zeros_below ? 32 - __clz(zeros_below) : 0;
}

// Length of the run of set bits starting at column s.
__device__ __forceinline__ int run_length_from(unsigned bits, int s) {
  const unsigned rest = ~bits >> s;
  return rest == 0 ? 32 - s : __ffs(rest) - 1;
}

// The unions that join one row's runs to the runs of the row above, in run terms: of all the
// foreground pixels of a run that touch one run above, only one does the union.
//   4-connectivity: a pixel unites with the pixel above when that pixel is foreground and either it
//     starts its own run or the pixel above-left is background (a new run above begins here).
//   8-connectivity: a run's first pixel unites with its above-left neighbour, else with the pixel
//     above; any pixel unites with its above-right neighbour when that starts a new run above (the
//     pixel above is background).
// Each run above that touches the run is found exactly once (its leftmost pixel in the run's
// window), so the partition is the per-pixel one with ~run-many atomics instead of ~pixel-many.
// Returns a bit set: 1 = up-left, 2 = up, 4 = up-right.
__device__ __forceinline__ unsigned run_unions(unsigned above, bool run_first, bool left_exists, bool right_exists,
                                               int tx, int connectivity, bool above_left, bool above_right) {
  const bool up = bit(above, tx);
  if (connectivity == 4) return up && (run_first || !above_left) ? 2u : 0u;
  unsigned which = 0;
  if (run_first) {
    if (left_exists && above_left) which |= 1u;
    else if (up) which |= 2u;
  }
  if (right_exists && above_right && !up) which |= 4u;
  return which;
}

// Pass 1, one block per 32x32 tile, one warp per tile row. parent[k] (image-local raster index k) =
// raster index of the pixel's root within its tile, -1 for background; tile_area[k] = the tile
// component's size at its root, 0 elsewhere. Each pixel starts at its row run's first pixel (one
// ballot), runs are joined to the runs above (run_unions), and only a run's first pixel walks to the
// root and adds the run's length to the area; the others take the root from it by a shuffle.
// With `count_above`, also counts each image's pixels above it (the triplet rule's test).
// At least 4 resident blocks per multiprocessor: without the hint ptxas capped this kernel at 32
// registers and spilled.
template <typename T>
__global__ void __launch_bounds__(kTileThreads, 4)
    local_kernel(const T* __restrict__ input, Geometry g, IsForeground<T> fg, const uint8_t* __restrict__ keep_image,
                 int connectivity, int32_t* __restrict__ parent, int32_t* __restrict__ tile_area,
                 IsForeground<T> above, int32_t* __restrict__ count_above) {
  __shared__ int32_t local[kTile * kTile];
  __shared__ int32_t area[kTile * kTile];
  __shared__ unsigned row_bits[kTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int32_t r0 = blockIdx.y * kTile, c0 = blockIdx.x * kTile;
  const int32_t c = c0 + tx;
  for (int64_t n = blockIdx.z; n < g.n; n += gridDim.z) {
    const bool keep = keep_image == nullptr || keep_image[n] != 0;
    int above_count = 0;
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int lr = ty + j * kRowsPerPass, li = lr * kTile + tx;
      const int32_t r = r0 + lr;
      bool on = false;
      if (r < g.h && c < g.w) {
        const T v = input[n * g.sn + r * g.sh + c * g.sw];
        on = keep && fg(v);
        if (count_above) above_count += above(v) ? 1 : 0;
      }
      const unsigned bits = __ballot_sync(0xffffffffu, on);
      if (tx == 0) row_bits[lr] = bits;
      local[li] = on ? lr * kTile + run_start_of(bits, tx) : -1;
      area[li] = 0;
    }
    if (count_above) {  // one atomic per warp that saw pixels above `top`
      above_count = warp_sum(above_count);
      if (tx == 0 && above_count > 0) atomicAdd(&count_above[n], above_count);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int lr = ty + j * kRowsPerPass, li = lr * kTile + tx;
      if (lr == 0) continue;
      const unsigned bits = row_bits[lr], up_bits = row_bits[lr - 1];
      if (!bit(bits, tx)) continue;
      // Path halving in shared memory keeps the trees of a large or noisy tile shallow; it only
      // ever re-points a node at an ancestor.
      const unsigned which = run_unions(up_bits, !bit(bits, tx - 1), tx > 0, tx + 1 < kTile, tx, connectivity,
                                        bit(up_bits, tx - 1), bit(up_bits, tx + 1));
      if (which & 1u) unite<true>(local, li, li - kTile - 1);
      if (which & 2u) unite<true>(local, li, li - kTile);
      if (which & 4u) unite<true>(local, li, li - kTile + 1);
    }
    __syncthreads();
    int32_t root[kRowsPerThread];
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int lr = ty + j * kRowsPerPass, li = lr * kTile + tx;
      const unsigned bits = row_bits[lr];
      const bool on = bit(bits, tx);
      const int start = on ? run_start_of(bits, tx) : tx;
      const bool first = on && start == tx;
      int32_t run_root = -1;
      if (first) {
        run_root = find_root_halving(local, li);
        atomicAdd(&area[run_root], run_length_from(bits, tx));
      }
      // Every lane of the warp (one tile row) takes part; background lanes read their own -1.
      run_root = __shfl_sync(0xffffffffu, run_root, start);
      root[j] = on ? run_root : -1;
    }
    __syncthreads();
    int32_t* p = parent + n * g.hw();
    int32_t* a = tile_area + n * g.hw();
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int lr = ty + j * kRowsPerPass, li = lr * kTile + tx;
      const int32_t r = r0 + lr;
      if (r >= g.h || c >= g.w) continue;
      const int32_t k = r * g.w + c;
      // tile_area is nonzero exactly at tile roots: pass 3 finds them by it (their parents change
      // in pass 2, so parent[k] == k no longer tells).
      p[k] = root[j] < 0 ? -1 : (r0 + root[j] / kTile) * g.w + c0 + root[j] % kTile;
      a[k] = root[j] == li ? area[li] : 0;
    }
    __syncthreads();  // shared arrays are reused by the next image
  }
}

// Pass 2: unions across tile borders; the rest of each tile was joined in pass 1. A tile's top row
// joins the last row of the tiles above by the run rule (one warp: ballots of the two rows, the
// above-left/right neighbours of the row's end pixels read beside them); the tile's first and last
// columns join their left neighbour and, with 8-connectivity, their diagonal neighbours in the
// tiles beside (the top row's diagonals were joined with its row).
__global__ void __launch_bounds__(kTileThreads, 4) border_kernel(Geometry g, int connectivity, int32_t* parent) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int32_t r0 = blockIdx.y * kTile, c0 = blockIdx.x * kTile;
  const int32_t c = c0 + tx;
  const bool in_width = c < g.w;
  const bool left_edge = tx == 0 && c > 0 && in_width;
  const bool right_edge = tx == kTile - 1 && c + 1 < g.w;
  for (int64_t n = blockIdx.z; n < g.n; n += gridDim.z) {
    int32_t* p = parent + n * g.hw();
    if (ty == 0 && r0 > 0 && r0 < g.h) {  // the whole warp, so the ballots see every lane
      const int32_t k = r0 * g.w + c, up = k - g.w;
      const bool on = in_width && p[k] >= 0;
      const unsigned bits = __ballot_sync(0xffffffffu, on);
      const unsigned up_bits = __ballot_sync(0xffffffffu, in_width && p[up] >= 0);
      if (on) {
        const bool above_left = tx > 0 ? bit(up_bits, tx - 1) : c > 0 && p[up - 1] >= 0;
        const bool above_right = tx + 1 < kTile ? bit(up_bits, tx + 1) : c + 1 < g.w && p[up + 1] >= 0;
        const unsigned which = run_unions(up_bits, !bit(bits, tx - 1), c > 0, c + 1 < g.w, tx, connectivity,
                                          above_left, above_right);
        if (which & 1u) unite<true>(p, k, up - 1);
        if (which & 2u) unite<true>(p, k, up);
        if (which & 4u) unite<true>(p, k, up + 1);
      }
    }
    if (!(left_edge || right_edge)) continue;
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int lr = ty + j * kRowsPerPass;
      const int32_t r = r0 + lr;
      if (r >= g.h) continue;
      const int32_t k = r * g.w + c;
      if (p[k] < 0) continue;
      if (left_edge && p[k - 1] >= 0) unite<true>(p, k, k - 1);
      if (connectivity == 8 && lr > 0) {
        const int32_t up = k - g.w;
        if (left_edge && p[up - 1] >= 0) unite<true>(p, k, up - 1);
        if (right_edge && p[up + 1] >= 0) unite<true>(p, k, up + 1);
      }
    }
  }
}

// Pass 3, one thread per pixel: a tile root (tile_area[k] > 0) finds its final root, points at it and
// adds its tile area there. Final roots only receive additions, and every other tile root reads
// only its own area, so the areas are exact whatever the order. root_flags (optional, batch-flat)
// receives 1 at final roots, 0 elsewhere: label_cuda writes them into its labels output, where the
// in-place prefix sum turns them into component ranks.
__global__ void __launch_bounds__(kThreads)
    resolve_kernel(Geometry g, int32_t* parent, int32_t* tile_area, int32_t* root_flags) {
  const int64_t hw = g.hw();
  for (int64_t n = blockIdx.y; n < g.n; n += gridDim.y) {
    int32_t* p = parent + n * hw;
    int32_t* a = tile_area + n * hw;
    for (int64_t k = blockIdx.x * int64_t(kThreads) + threadIdx.x; k < hw; k += int64_t(gridDim.x) * kThreads) {
      bool final_root = false;
      if (a[k] > 0) {
        // A plain walk: a halving store here could land after a tile root's final store below and
        // leave it pointing at a non-root, which final_root() relies on never happening.
        const int32_t root = find_root(p, static_cast<int32_t>(k));
        if (root == k) {
          final_root = true;
        } else {
          p[k] = root;
          atomicAdd(&a[root], a[k]);
        }
      }
      if (root_flags) root_flags[n * hw + k] = final_root ? 1 : 0;
    }
  }
}

// After pass 3 every pixel is at most two steps from its final root, and a pixel is a final root
// exactly when it is its own parent (pass 3 re-pointed every other tile root; background is -1).
__device__ __forceinline__ int32_t final_root(const int32_t* p, int64_t k) {
  const int32_t tile_root = p[k];
  return tile_root < 0 ? -1 : p[tile_root];
}

__device__ __forceinline__ bool is_final_root(const int32_t* p, int64_t k) { return p[k] == k; }

// label_cuda, after the in-place exclusive scan of the root flags over the whole batch (rank[i] =
// final roots before flat pixel i): each image's number of components, one thread per image.
__global__ void __launch_bounds__(kThreads)
    image_counts_kernel(Geometry g, const int32_t* parent, const int32_t* rank, int32_t* per_image) {
  const int64_t hw = g.hw();
  for (int64_t n = blockIdx.x * int64_t(kThreads) + threadIdx.x; n < g.n; n += int64_t(gridDim.x) * kThreads) {
    const int64_t base = n * hw, last = hw - 1;
    per_image[n] = rank[base + last] + (is_final_root(parent + base, last) ? 1 : 0) - rank[base];
  }
}

// label_cuda, once the host has allocated `areas_out` (one int64 per component of the batch): each
// final root writes its area at its batch-wide rank and replaces its area by its image-local label
// (rank - the image's first rank + 1), which write_labels_kernel then spreads. Only a root's own
// thread touches its area, and rank is only read here, so nothing races.
__global__ void __launch_bounds__(kThreads)
    compact_areas_kernel(Geometry g, const int32_t* parent, const int32_t* rank, int32_t* area, int64_t* areas_out) {
  const int64_t hw = g.hw();
  for (int64_t n = blockIdx.y; n < g.n; n += gridDim.y) {
    const int64_t base = n * hw;
    const int32_t* p = parent + base;
    for (int64_t k = blockIdx.x * int64_t(kThreads) + threadIdx.x; k < hw; k += int64_t(gridDim.x) * kThreads) {
      if (!is_final_root(p, k)) continue;
      const int32_t r = rank[base + k];
      areas_out[r] = area[base + k];
      area[base + k] = r - rank[base] + 1;
    }
  }
}

// The last pass of label_cuda: every pixel takes its final root's label (compact_areas_kernel left it
// in the root's area slot), overwriting the ranks that were kept in `labels` until now.
__global__ void __launch_bounds__(kThreads)
    write_labels_kernel(Geometry g, const int32_t* parent, const int32_t* root_label, int32_t* labels) {
  const int64_t hw = g.hw();
  for (int64_t n = blockIdx.y; n < g.n; n += gridDim.y) {
    const int32_t* p = parent + n * hw;
    const int32_t* l = root_label + n * hw;
    for (int64_t k = blockIdx.x * int64_t(kThreads) + threadIdx.x; k < hw; k += int64_t(gridDim.x) * kThreads) {
      const int32_t root = final_root(p, k);
      labels[n * hw + k] = root < 0 ? 0 : l[root];
    }
  }
}

// With `components`, also counts each image's kept components: a kept pixel that is its own parent
// is a final root (pass 3 re-pointed every other tile root), one per component; one atomic per warp.
// The loop runs per warp (its first pixel decides), so the ballot always has the whole warp.
__global__ void __launch_bounds__(kThreads)
    write_mask_kernel(Geometry g, const int32_t* parent, const int32_t* area, int64_t min_area,
                      const int32_t* count_above, int64_t triplet_min, uint8_t* out, int32_t* components) {
  const int64_t hw = g.hw();
  const int lane = threadIdx.x % 32;
  for (int64_t n = blockIdx.y; n < g.n; n += gridDim.y) {
    const int32_t* p = parent + n * hw;
    const int32_t* a = area + n * hw;
    const bool kept = count_above == nullptr || count_above[n] >= triplet_min;
    for (int64_t k0 = blockIdx.x * int64_t(kThreads) + threadIdx.x - lane; k0 < hw;
         k0 += int64_t(gridDim.x) * kThreads) {
      const int64_t k = k0 + lane;
      bool on = false, root = false;
      if (k < hw) {
        if (kept) {
          const int32_t tile_root = p[k];
          if (tile_root >= 0) on = min_area <= 0 || a[p[tile_root]] >= min_area;
          root = on && tile_root == k;
        }
        out[n * hw + k] = on ? 1 : 0;
      }
      if (components != nullptr) {
        const unsigned roots = __ballot_sync(0xffffffffu, root);
        if (lane == 0 && roots != 0) atomicAdd(&components[n], __popc(roots));
      }
    }
  }
}

}  // namespace pneumoseg::postprocess::kernels
