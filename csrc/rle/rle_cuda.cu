// CUDA RLE: data-parallel encode (unit walks + block scans, see rle_units.h) with the strings
// formatted on the device and fetched in one device-to-host copy per batch in the common case;
// decode paints host-parsed runs with one warp per run piece.
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cuda_check.h"
#include "common/cuda_memory.h"
#include "common/dispatch.h"
#include "rle/rle.h"
#include "rle/rle_units.h"

namespace pneumoseg::rle {
namespace {

constexpr int kThreads = 256;
// One block per image for the scans; 512 threads keep an int64 cub::BlockScan within the register
// budget (1024 threads needed 90 registers each: more than 65536 / 1024, a launch failure).
constexpr int kScanThreads = 512;
constexpr int kScanItems = 8;
// Bytes of formatted text per image fetched with the header in the first copy: a real SIIM mask
// needs about 2 KB, so one copy suffices unless masks are dense noise.
constexpr int64_t kSpeculativeBytesPerImage = 16 << 10;
// Runs are painted in pieces of at most this many pixels so one full mask does not serialise a warp.
constexpr int64_t kPaintPiece = 4096;

struct UnitGrid {
  int64_t n, h, w, s, u;  // images, rows, columns, units per column, units per image
  PNEUMOSEG_HD int64_t threads() const { return n * u; }
};

// Thread g -> (image, column, segment) with columns fastest, so a warp reads consecutive columns
// of one row (coalesced); the unit's storage index is column-major, c * S + s.
struct UnitCoords {
  int64_t image, col, seg, slot;
};
__device__ __forceinline__ UnitCoords unit_coords(const UnitGrid& g, int64_t t) {
  UnitCoords uc;
  uc.col = t % g.w;
  const int64_t rest = t / g.w;
  uc.seg = rest % g.s;
  uc.image = rest / g.s;
  uc.slot = uc.image * g.u + uc.col * g.s + uc.seg;
  return uc;
}

template <typename T>
__device__ __forceinline__ ColumnMajorMask<T> image_of(const T* base, int64_t stride_n, int64_t stride_h,
                                                       int64_t stride_w, const UnitGrid& g, int64_t image) {
  return ColumnMajorMask<T>{base + image * stride_n, g.h, g.w, stride_h, stride_w};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) count_transitions_kernel(const T* masks, int64_t sn, int64_t sh, int64_t sw, UnitGrid g,
                                         int64_t* count, int64_t* last) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < g.threads();
       t += int64_t(gridDim.x) * blockDim.x) {
    const UnitCoords uc = unit_coords(g, t);
    int64_t c = 0, l = -1;
    walk_unit(image_of(masks, sn, sh, sw, g, uc.image), uc.col, uc.seg, [&](int64_t k) {
      ++c;
      l = k;
    });
    count[uc.slot] = c;
    last[uc.slot] = l;
  }
}

struct MaxOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

// One block per image: first_j = exclusive sum of counts, prev_k = exclusive max of last transitions
// (transitions grow with the unit index, so the max is the last transition before the unit). Each
// thread scans kScanItems consecutive units, so a 1024x1024 image (32768 units) takes 8 rounds.
__global__ void __launch_bounds__(kScanThreads)
    scan_units_kernel(int64_t units, int64_t* count_to_first_j, int64_t* last_to_prev_k) {
  using Scan = cub::BlockScan<int64_t, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  int64_t* counts = count_to_first_j + blockIdx.x * units;
  int64_t* lasts = last_to_prev_k + blockIdx.x * units;
  int64_t carry_sum = 0, carry_max = -1;
  for (int64_t base = 0; base < units; base += int64_t(kScanThreads) * kScanItems) {
    const int64_t first = base + int64_t(threadIdx.x) * kScanItems;
    int64_t c[kScanItems], l[kScanItems];
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t i = first + k;
      c[k] = i < units ? counts[i] : 0;
      l[k] = i < units ? lasts[i] : -1;
    }
    int64_t sum_total, max_total;
    Scan(temp).ExclusiveSum(c, c, sum_total);
    __syncthreads();
    Scan(temp).ExclusiveScan(l, l, int64_t(-1), MaxOp(), max_total);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t i = first + k;
      if (i < units) {
        counts[i] = carry_sum + c[k];
        lasts[i] = l[k] > carry_max ? l[k] : carry_max;
      }
    }
    carry_sum += sum_total;
    carry_max = max_total > carry_max ? max_total : carry_max;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) count_chars_kernel(const T* masks, int64_t sn, int64_t sh, int64_t sw, UnitGrid g, Style style,
                                   const int64_t* first_j, const int64_t* prev_k, int64_t* chars) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < g.threads();
       t += int64_t(gridDim.x) * blockDim.x) {
    const UnitCoords uc = unit_coords(g, t);
    int64_t j = first_j[uc.slot], prev = prev_k[uc.slot], n = 0;
    walk_unit(image_of(masks, sn, sh, sw, g, uc.image), uc.col, uc.seg, [&](int64_t k) {
      n += transition_chars(style, j++, k, prev);
      prev = k;
    });
    chars[uc.slot] = n;
  }
}

// In-place exclusive sum of data[0, n) by one block of kScanThreads threads, kScanItems consecutive
// values per thread; returns the total (to every thread).
__device__ int64_t block_exclusive_sum(int64_t* data, int64_t n) {
  using Scan = cub::BlockScan<int64_t, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  int64_t carry = 0;
  for (int64_t base = 0; base < n; base += int64_t(kScanThreads) * kScanItems) {
    const int64_t first = base + int64_t(threadIdx.x) * kScanItems;
    int64_t c[kScanItems];
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) c[k] = first + k < n ? data[first + k] : 0;
    int64_t total;
    Scan(temp).ExclusiveSum(c, c, total);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      if (first + k < n) data[first + k] = carry + c[k];
    }
    carry += total;
  }
  return carry;
}

// One block per image: chars -> first character of each unit within its image; image_len[n] = total.
__global__ void __launch_bounds__(kScanThreads) scan_chars_kernel(int64_t units, int64_t* chars_to_first, int64_t* image_len) {
  const int64_t total = block_exclusive_sum(chars_to_first + blockIdx.x * units, units);
  if (threadIdx.x == 0) image_len[blockIdx.x] = total;
}

// One block: image lengths -> image offsets, with the grand total in offsets[n].
__global__ void __launch_bounds__(kScanThreads) scan_images_kernel(int64_t n, const int64_t* image_len, int64_t* offsets) {
  for (int64_t i = threadIdx.x; i < n; i += kScanThreads) offsets[i] = image_len[i];
  __syncthreads();
  const int64_t total = block_exclusive_sum(offsets, n);
  if (threadIdx.x == 0) offsets[n] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) write_chars_kernel(const T* masks, int64_t sn, int64_t sh, int64_t sw, UnitGrid g, Style style,
                                   const int64_t* first_j, const int64_t* prev_k, const int64_t* first_char,
                                   const int64_t* image_offsets, char* payload, int64_t capacity) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < g.threads();
       t += int64_t(gridDim.x) * blockDim.x) {
    const UnitCoords uc = unit_coords(g, t);
    int64_t j = first_j[uc.slot], prev = prev_k[uc.slot];
    int64_t pos = image_offsets[uc.image] + first_char[uc.slot];
    walk_unit(image_of(masks, sn, sh, sw, g, uc.image), uc.col, uc.seg, [&](int64_t k) {
      const uint64_t v = transition_number(style, j, k, prev);
      const int d = decimal_digits(v);
      const int64_t need = d + (j > 0 ? 1 : 0);
      if (pos >= 0 && pos + need <= capacity) {  // beyond the speculative window: written on the retry
        char* dst = payload + pos;
        if (j > 0) *dst++ = ' ';
        write_decimal(dst, v, d);
      }
      pos += need;
      prev = k;
      ++j;
    });
  }
}

__global__ void __launch_bounds__(kThreads) paint_runs_kernel(const Run* runs, int64_t n_runs, uint8_t* out, int64_t n, int64_t h, int64_t w,
                                  int64_t sn, int64_t sh, int64_t sw) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < n_runs; i += warps) {
    const Run run = runs[i];
    if (run.image < 0 || run.image >= n || run.start < 0 || run.end > h * w) continue;  // never write outside
    uint8_t* image = out + run.image * sn;
    for (int64_t k = run.start + lane; k < run.end; k += 32) image[(k % h) * sh + (k / h) * sw] = 1;
  }
}

int grid_for(int64_t threads, int block) {
  const int64_t blocks = (threads + block - 1) / block;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 8));
}

}  // namespace

void encode_cuda(const TensorView& masks, Style style, void* stream_ptr, EncodedBatch& out) {
  check_ndim(masks, 3, "masks");
  check_device(masks, Device::CUDA, "masks");
  const int64_t N = masks.shape[0], H = masks.shape[1], W = masks.shape[2];
  if (H * W >= (int64_t(1) << 31)) fail_value("masks: images of 2^31 pixels or more are not supported");
  out.pieces.clear();
  out.first.assign(N + 1, 0);
  if (N == 0) return;
  std::vector<int64_t> image_offsets(N + 1, 0);
  std::string text;

  if (H > 0 && W > 0) {
    cuda::DeviceGuard device(masks.device_index);
    auto stream = static_cast<cudaStream_t>(stream_ptr);
    const int64_t S = units_per_column(H);
    const UnitGrid g{N, H, W, S, S * W};
    const int64_t slots = N * g.u;
    const int64_t capacity = N * kSpeculativeBytesPerImage;
    // Header (image offsets) and payload are adjacent so one copy fetches both.
    const size_t header_bytes = sizeof(int64_t) * (N + 1);
    const size_t payload_at = (header_bytes + 255) / 256 * 256;
    const size_t arrays_at = (payload_at + capacity + 255) / 256 * 256;
    const size_t arrays_bytes = sizeof(int64_t) * (3 * slots + N);
    cuda::ScratchBuffer scratch(arrays_at + arrays_bytes, stream);
    auto* offsets_d = scratch.as<int64_t>(0);
    auto* payload_d = scratch.as<char>(payload_at);
    auto* count = scratch.as<int64_t>(arrays_at);
    int64_t* last = count + slots;
    int64_t* chars = last + slots;
    int64_t* image_len = chars + slots;

    const int grid = grid_for(g.threads(), kThreads);
    PNEUMOSEG_DISPATCH_ALL(masks.dtype, "masks", [&] {
      const auto* data = static_cast<const scalar_t*>(masks.data);
      const int64_t sn = masks.strides[0], sh = masks.strides[1], sw = masks.strides[2];
      count_transitions_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(data, sn, sh, sw, g, count, last);
      PNEUMOSEG_CHECK_LAUNCH("count_transitions_kernel");
      scan_units_kernel<<<N, kScanThreads, 0, stream>>>(g.u, count, last);
      PNEUMOSEG_CHECK_LAUNCH("scan_units_kernel");
      count_chars_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(data, sn, sh, sw, g, style, count, last, chars);
      PNEUMOSEG_CHECK_LAUNCH("count_chars_kernel");
      scan_chars_kernel<<<N, kScanThreads, 0, stream>>>(g.u, chars, image_len);
      PNEUMOSEG_CHECK_LAUNCH("scan_chars_kernel");
      scan_images_kernel<<<1, kScanThreads, 0, stream>>>(N, image_len, offsets_d);
      PNEUMOSEG_CHECK_LAUNCH("scan_images_kernel");
      write_chars_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(data, sn, sh, sw, g, style, count, last, chars,
                                                                  offsets_d, payload_d, capacity);
      PNEUMOSEG_CHECK_LAUNCH("write_chars_kernel");

      auto& pinned = cuda::pinned_staging();
      std::lock_guard<std::mutex> hold(pinned.lock);
      char* host = static_cast<char*>(pinned.reserve(payload_at + capacity));
      PNEUMOSEG_CUDA_CHECK(
          cudaMemcpyAsync(host, offsets_d, payload_at + capacity, cudaMemcpyDeviceToHost, stream));
      PNEUMOSEG_CUDA_CHECK(cudaStreamSynchronize(stream));
      std::memcpy(image_offsets.data(), host, header_bytes);
      const int64_t total = image_offsets[N];
      if (total < 0) throw NativeError("encode_cuda: negative text length");
      if (total <= capacity) {
        text.assign(host + payload_at, total);
      } else {
        // Dense masks: the text did not fit the window; format again into an exact buffer.
        cuda::ScratchBuffer full(total, stream);
        write_chars_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(data, sn, sh, sw, g, style, count, last, chars,
                                                                    offsets_d, full.as<char>(), total);
        PNEUMOSEG_CHECK_LAUNCH("write_chars_kernel (retry)");
        host = static_cast<char*>(pinned.reserve(total));
        PNEUMOSEG_CUDA_CHECK(cudaMemcpyAsync(host, full.as<char>(), total, cudaMemcpyDeviceToHost, stream));
        PNEUMOSEG_CUDA_CHECK(cudaStreamSynchronize(stream));
        text.assign(host, total);
      }
    });
  }

  // Empty masks have no text on the device; give them the style's empty string here.
  const char* empty = style == Style::Siim ? "-1" : "";
  out.pieces.reserve(N);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t a = image_offsets[i], b = image_offsets[i + 1];
    if (a < 0 || b < a || b > static_cast<int64_t>(text.size())) throw NativeError("encode_cuda: bad offsets");
    if (a == b) {
      out.pieces.emplace_back(empty);
    } else {
      out.pieces.emplace_back(text, a, b - a);
    }
    out.first[i + 1] = i + 1;
  }
}

void paint_runs_cuda(const std::vector<Run>& runs, const TensorView& out, void* stream_ptr) {
  check_ndim(out, 3, "out");
  check_device(out, Device::CUDA, "out");
  if (out.dtype != DType::UInt8) fail_value("out must be uint8");
  if (runs.empty()) return;
  const int64_t N = out.shape[0], H = out.shape[1], W = out.shape[2];
  // Split long runs so work per warp is bounded (a full 1024x1024 mask is one run).
  std::vector<Run> pieces;
  pieces.reserve(runs.size());
  for (const Run& r : runs) {
    for (int64_t a = r.start; a < r.end; a += kPaintPiece) pieces.push_back(Run{r.image, a, std::min(r.end, a + kPaintPiece)});
  }
  cuda::DeviceGuard device(out.device_index);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  cuda::ScratchBuffer runs_d(sizeof(Run) * pieces.size(), stream);
  // From pageable memory: the call returns once `pieces` has been staged, so it may be freed after.
  PNEUMOSEG_CUDA_CHECK(cudaMemcpyAsync(runs_d.as<Run>(), pieces.data(), sizeof(Run) * pieces.size(),
                                       cudaMemcpyHostToDevice, stream));
  const int64_t n_pieces = static_cast<int64_t>(pieces.size());
  const int grid = grid_for(n_pieces * 32, kThreads);
  paint_runs_kernel<<<grid, kThreads, 0, stream>>>(runs_d.as<Run>(), n_pieces, static_cast<uint8_t*>(out.data), N,
                                                   H, W, out.strides[0], out.strides[1], out.strides[2]);
  PNEUMOSEG_CHECK_LAUNCH("paint_runs_kernel");
}

}  // namespace pneumoseg::rle
