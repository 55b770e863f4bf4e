// CUDA RLE: data-parallel encode (unit walks + batch-wide device scans, see rle_units.h) with the
// strings formatted on the device and fetched in one device-to-host copy per batch in the common
// case; decode paints host-parsed runs with one warp per run piece.
#include <cub/device/device_scan.cuh>

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
    last[uc.slot] = l < 0 ? -1 : uc.image * g.h * g.w + l;  // a batch key: see unit_start()
  }
}

struct MaxOp {
  __host__ __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) count_chars_kernel(const T* masks, int64_t sn, int64_t sh, int64_t sw, UnitGrid g, Style style,
                                   const int64_t* first_j, const int64_t* prev_k, int64_t* chars) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < g.threads();
       t += int64_t(gridDim.x) * blockDim.x) {
    const UnitCoords uc = unit_coords(g, t);
    UnitStart st = unit_start(first_j, prev_k, uc.image, g.u, g.h * g.w, uc.slot);
    int64_t n = 0;
    walk_unit(image_of(masks, sn, sh, sw, g, uc.image), uc.col, uc.seg, [&](int64_t k) {
      n += transition_chars(style, st.j++, k, st.prev);
      st.prev = k;
    });
    chars[uc.slot] = n;
  }
}

// offsets[i] = where image i's text starts in the batch's (its first unit's first character);
// offsets[n] = the total length.
__global__ void __launch_bounds__(kThreads)
    image_offsets_kernel(int64_t n, int64_t units, const int64_t* first_char, const int64_t* chars, int64_t* offsets) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i <= n; i += int64_t(gridDim.x) * blockDim.x) {
    offsets[i] = i < n ? first_char[i * units] : first_char[n * units - 1] + chars[n * units - 1];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) write_chars_kernel(const T* masks, int64_t sn, int64_t sh, int64_t sw, UnitGrid g, Style style,
                                   const int64_t* first_j, const int64_t* prev_k, const int64_t* first_char,
                                   char* payload, int64_t capacity) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < g.threads();
       t += int64_t(gridDim.x) * blockDim.x) {
    const UnitCoords uc = unit_coords(g, t);
    UnitStart st = unit_start(first_j, prev_k, uc.image, g.u, g.h * g.w, uc.slot);
    int64_t pos = first_char[uc.slot];  // in the batch's text
    walk_unit(image_of(masks, sn, sh, sw, g, uc.image), uc.col, uc.seg, [&](int64_t k) {
      const uint64_t v = transition_number(style, st.j, k, st.prev);
      const int d = decimal_digits(v);
      const int64_t need = d + (st.j > 0 ? 1 : 0);
      if (pos >= 0 && pos + need <= capacity) {  // beyond the speculative window: written on the retry
        char* dst = payload + pos;
        if (st.j > 0) *dst++ = ' ';
        write_decimal(dst, v, d);
      }
      pos += need;
      st.prev = k;
      ++st.j;
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
    const size_t arrays_bytes = sizeof(int64_t) * 4 * slots;
    // Batch-wide scans (cub's single-pass device scan): the same temporary storage serves all three.
    size_t scan_bytes = 0, need = 0;
    PNEUMOSEG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, need, static_cast<int64_t*>(nullptr),
                                                       static_cast<int64_t*>(nullptr), slots, stream));
    scan_bytes = std::max(scan_bytes, need);
    PNEUMOSEG_CUDA_CHECK(cub::DeviceScan::ExclusiveScan(nullptr, need, static_cast<int64_t*>(nullptr),
                                                        static_cast<int64_t*>(nullptr), MaxOp(), int64_t(-1), slots,
                                                        stream));
    scan_bytes = std::max(scan_bytes, need);
    const size_t scan_at = (arrays_at + arrays_bytes + 255) / 256 * 256;
    cuda::ScratchBuffer scratch(scan_at + scan_bytes, stream);
    auto* offsets_d = scratch.as<int64_t>(0);
    auto* payload_d = scratch.as<char>(payload_at);
    auto* count = scratch.as<int64_t>(arrays_at);  // scanned in place into first_j
    int64_t* last = count + slots;                  // scanned in place into prev_key
    int64_t* chars = last + slots;
    int64_t* first_char = chars + slots;
    void* scan_temp = scratch.as<char>(scan_at);

    const int grid = grid_for(g.threads(), kThreads);
    PNEUMOSEG_DISPATCH_ALL(masks.dtype, "masks", [&] {
      const auto* data = static_cast<const scalar_t*>(masks.data);
      const int64_t sn = masks.strides[0], sh = masks.strides[1], sw = masks.strides[2];
      count_transitions_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(data, sn, sh, sw, g, count, last);
      PNEUMOSEG_CHECK_LAUNCH("count_transitions_kernel");
      size_t temp_bytes = scan_bytes;
      PNEUMOSEG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(scan_temp, temp_bytes, count, count, slots, stream));
      temp_bytes = scan_bytes;
      PNEUMOSEG_CUDA_CHECK(
          cub::DeviceScan::ExclusiveScan(scan_temp, temp_bytes, last, last, MaxOp(), int64_t(-1), slots, stream));
      count_chars_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(data, sn, sh, sw, g, style, count, last, chars);
      PNEUMOSEG_CHECK_LAUNCH("count_chars_kernel");
      temp_bytes = scan_bytes;
      PNEUMOSEG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(scan_temp, temp_bytes, chars, first_char, slots, stream));
      image_offsets_kernel<<<grid_for(N + 1, kThreads), kThreads, 0, stream>>>(N, g.u, first_char, chars, offsets_d);
      PNEUMOSEG_CHECK_LAUNCH("image_offsets_kernel");
      write_chars_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(data, sn, sh, sw, g, style, count, last, first_char,
                                                                  payload_d, capacity);
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
        write_chars_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(data, sn, sh, sw, g, style, count, last,
                                                                    first_char, full.as<char>(), total);
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
