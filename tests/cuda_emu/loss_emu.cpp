// Runs the CUDA combo-loss kernels (csrc/loss/combo_loss_cuda_kernels.cuh, combo_loss_cuda_finalize.cuh)
// on the CPU through cuda_emu.h, with the launch sequence of forward_cuda and backward_cuda
// (combo_loss_cuda.cu: blocks_per_image, then launch_forward / launch_backward of the kernels header;
// keep the three in step), for tests/test_loss_kernels_emulated.py.
//
//   loss_emu IN OUT
// IN: int64 header [n, pixels, logits dtype, target dtype (pneumoseg::DType values), per_image,
// loss_is_double, grad_is_double, logits / target / grad byte offsets from a 256-byte boundary, SM count,
// most blocks per image (0: no cap), 32-bit index limit (0: INT32_MAX)], float64 [bce_weight,
// dice_weight, focal_weight, focal_gamma, smooth, pos_weight, incoming gradient], then the logits' and
// the targets' raw bytes (n * pixels each). OUT: int64 [blocks per image, forward vectorised, backward
// vectorised, backward on 32-bit indices], float64 loss, float64 state (n x kStateCols), the gradient's
// raw bytes.
//
// Device math on the CPU: rcp.approx.ftz.f32 is a correctly rounded reciprocal here (the GPU's is within
// 1 ulp before the Newton step that follows it), max.NaN and the half conversions are their portable
// equivalents (the same values; NaN payloads may differ from cvt's canonical NaN).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define EMU_POISON(p, n) ((void)(p), (void)(n))
#define EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

// The kernels choose 32-bit grid-stride indices when an image's vectors plus two strides fit in
// INT32_MAX. Images that large do not fit in a test, so the emulation reads that limit from a variable:
// a small limit sends a small image down the 64-bit path. Every header that could use the macro is
// included above, so only the kernel headers below see the variable.
namespace emu {
inline int64_t g_int32_max = INT32_MAX;
}
#undef INT32_MAX
#define INT32_MAX (::emu::g_int32_max)

// clang-format off: the emulation must come first
#include "loss/combo_loss_cuda_kernels.cuh"
#include "loss/combo_loss_cuda_finalize.cuh"
// clang-format on

using namespace pneumoseg;
using namespace pneumoseg::loss;
using namespace pneumoseg::loss::cuda_detail;

namespace {

// Device memory: `bytes` at `offset` past a 256-byte boundary (cudaMalloc's alignment), allocated to
// the byte so AddressSanitizer catches an access past the end, with the whole 8-byte granules before
// the data poisoned and the rest of the gap filled with a canary checked at the end.
class Buffer {
 public:
  Buffer(size_t bytes, size_t offset, uint8_t fill) : bytes_(bytes), offset_(offset) {
    if (posix_memalign(&base_, 256, offset + bytes + 1) != 0) std::abort();  // +1: never a zero-size block
    std::memset(base_, kCanary, offset);
    std::memset(data(), fill, bytes + 1);  // fresh device memory is garbage
    EMU_POISON(base_, offset & ~size_t(7));
    EMU_POISON(data() + bytes, 1);
  }
  ~Buffer() {
    EMU_UNPOISON(base_, offset_ + bytes_ + 1);
    std::free(base_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  uint8_t* data() const { return static_cast<uint8_t*>(base_) + offset_; }
  bool canary_intact() const {
    for (size_t i = offset_ & ~size_t(7); i < offset_; ++i) {
      if (static_cast<const uint8_t*>(base_)[i] != kCanary) return false;
    }
    return true;
  }

 private:
  static constexpr uint8_t kCanary = 0xa5;
  void* base_ = nullptr;
  size_t bytes_, offset_;
};

TensorView view(const Buffer& b, DType dtype, int64_t n, int64_t pixels) {
  TensorView v;
  v.data = b.data();
  v.dtype = dtype;
  v.device = Device::CUDA;
  v.ndim = 2;
  v.shape[0] = n;
  v.shape[1] = pixels;
  v.strides[0] = pixels;
  v.strides[1] = 1;
  return v;
}

// combo_loss_cuda.cu's blocks_per_image with the SM count given, and at most `cap` blocks (0: none): the
// tests cap it at a few blocks, so that the emulation runs several blocks per image, each looping over
// several vectors, at a fraction of the cost.
int blocks_per_image(int64_t images, int64_t pixels, int width, int sms, int cap) {
  const int64_t wanted = (int64_t(sms) * 8 + images - 1) / images;
  const int64_t useful = (pixels + int64_t(kThreads) * width - 1) / (int64_t(kThreads) * width);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, useful, 65535})));
  return cap > 0 ? std::min(blocks, cap) : blocks;
}

// launch_forward and launch_backward of combo_loss_cuda_kernels.cuh, with emu::launch for <<<...>>>.
template <typename L>
void launch_forward(const TensorView& logits, const TensorView& target, const ComboParams& p, int blocks,
                    double* partials) {
  const int64_t N = logits.shape[0], P = logits.shape[1];
  PNEUMOSEG_DISPATCH_TARGET(target.dtype, "target", [&] {
    with_focal_mode(focal_mode(p.focal_weight, p.focal_gamma), [&](auto mode) {
      with_vectorised(vectorisable(logits, target, nullptr, P), [&](auto vec) {
        emu::launch(dim3(blocks, N), dim3(kThreads), [&] {
          forward_partials_kernel<L, target_t, decltype(mode)::value, decltype(vec)::value>(
              static_cast<const L*>(logits.data), static_cast<const target_t*>(target.data), P, weight<L>(p),
              weight<L>(p) - 1, p.focal_gamma, partials);
        });
      });
    });
  });
}

template <typename L>
void launch_backward(const TensorView& grad_loss, const TensorView& logits, const TensorView& target,
                     const TensorView& state, const ComboParams& p, const TensorView& grad_logits, int blocks) {
  const int64_t N = logits.shape[0], P = logits.shape[1];
  PNEUMOSEG_DISPATCH_TARGET(target.dtype, "target", [&] {
    with_focal_mode(focal_mode(p.focal_weight, p.focal_gamma), [&](auto mode) {
      with_vectorised(vectorisable(logits, target, &grad_logits, P), [&](auto vec) {
        emu::launch(dim3(blocks, N), dim3(kThreads), [&] {
          backward_kernel<L, target_t, decltype(mode)::value, decltype(vec)::value>(
              grad_loss.data, grad_loss.dtype == DType::Float64, static_cast<const L*>(logits.data),
              static_cast<const target_t*>(target.data), static_cast<const double*>(state.data), P, weight<L>(p),
              weight<L>(p) - 1, p.focal_gamma, static_cast<L*>(grad_logits.data));
        });
      });
    });
  });
}

// PNEUMOSEG_DISPATCH_FLOATING, limited to the logits type LOSS_EMU_LOGITS (a DType value) when that is
// defined: the tests build one executable per logits type, in parallel, each a quarter of the kernels.
template <typename F>
void with_logits_type(DType dtype, F&& f) {
#if defined(LOSS_EMU_LOGITS)
  if (static_cast<int>(dtype) != LOSS_EMU_LOGITS) {
    std::fprintf(stderr, "loss_emu: built for logits dtype %d only\n", LOSS_EMU_LOGITS);
    std::exit(2);
  }
#define LOSS_EMU_WANTS(ENUM) (LOSS_EMU_LOGITS == static_cast<int>(DType::ENUM))
#else
#define LOSS_EMU_WANTS(ENUM) true
#endif
  switch (dtype) {
    case DType::Float16:
      if constexpr (LOSS_EMU_WANTS(Float16)) f(std::type_identity<Half16>());
      break;
    case DType::BFloat16:
      if constexpr (LOSS_EMU_WANTS(BFloat16)) f(std::type_identity<BFloat16Raw>());
      break;
    case DType::Float32:
      if constexpr (LOSS_EMU_WANTS(Float32)) f(std::type_identity<float>());
      break;
    case DType::Float64:
      if constexpr (LOSS_EMU_WANTS(Float64)) f(std::type_identity<double>());
      break;
    default:
      std::fprintf(stderr, "loss_emu: logits must be a floating dtype\n");
      std::exit(2);
  }
#undef LOSS_EMU_WANTS
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: loss_emu IN OUT\n");
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  int64_t head[13];
  double params[7];
  emu::read(in, head, 13);
  emu::read(in, params, 7);
  const auto [n, pixels, logits_dtype, target_dtype, per_image, loss_is_double, grad_is_double, logits_offset,
              target_offset, grad_offset, sms, cap, index_limit] = head;
  if (index_limit > 0) emu::g_int32_max = index_limit;
  const auto ld = static_cast<DType>(logits_dtype), td = static_cast<DType>(target_dtype);
  const size_t total = static_cast<size_t>(n * pixels);
  const size_t logits_bytes = total * dtype_size(ld), target_bytes = total * dtype_size(td);

  Buffer logits(logits_bytes, logits_offset, 0), target(target_bytes, target_offset, 0);
  emu::read(in, logits.data(), logits_bytes);
  emu::read(in, target.data(), target_bytes);
  ComboParams p;
  p.bce_weight = params[0];
  p.dice_weight = params[1];
  p.focal_weight = params[2];
  p.focal_gamma = params[3];
  p.smooth = params[4];
  p.pos_weight = params[5];
  p.per_image = per_image != 0;
  const TensorView x = view(logits, ld, n, pixels), t = view(target, td, n, pixels);

  // forward_cuda
  const int blocks = blocks_per_image(n, pixels, vector_width(ld), static_cast<int>(sms), static_cast<int>(cap));
  Buffer partials(sizeof(double) * kSums * n * blocks, 0, 0xff);  // NaN garbage, as a fresh scratch buffer
  Buffer state(sizeof(double) * kStateCols * n, 0, 0xff);         // torch.empty
  Buffer loss(8, 0, 0xff);
  with_logits_type(ld, [&](auto type) {
    launch_forward<typename decltype(type)::type>(x, t, p, blocks, reinterpret_cast<double*>(partials.data()));
  });
  emu::launch(dim3(1), dim3(kThreads), [&] {
    finalize_kernel(reinterpret_cast<const double*>(partials.data()), n, blocks, pixels, p,
                    reinterpret_cast<double*>(state.data()), loss.data(), loss_is_double != 0);
  });

  // backward_cuda, with the gradient of the loss read from device memory
  Buffer grad_loss(8, 0, 0);
  TensorView g;
  g.data = grad_loss.data();
  g.device = Device::CUDA;
  if (grad_is_double) {
    g.dtype = DType::Float64;
    const double v = params[6];
    std::memcpy(grad_loss.data(), &v, 8);
  } else {
    g.dtype = DType::Float32;
    const float v = static_cast<float>(params[6]);
    std::memcpy(grad_loss.data(), &v, 4);
  }
  TensorView s;
  s.data = state.data();
  s.dtype = DType::Float64;
  Buffer grad(logits_bytes, grad_offset, 0x7f);
  const TensorView gx = view(grad, ld, n, pixels);
  with_logits_type(ld, [&](auto type) { launch_backward<typename decltype(type)::type>(g, x, t, s, p, gx, blocks); });

  if (!grad.canary_intact() || !logits.canary_intact() || !target.canary_intact()) {
    std::fprintf(stderr, "loss_emu: a write before the start of an array\n");
    return 1;
  }
  const int width = vector_width(ld);
  const int64_t stride = int64_t(blocks) * kThreads;
  const int64_t info[4] = {blocks, vectorisable(x, t, nullptr, pixels), vectorisable(x, t, &gx, pixels),
                           pixels / width + 2 * stride <= emu::g_int32_max};
  double loss_value;
  if (loss_is_double) {
    std::memcpy(&loss_value, loss.data(), 8);
  } else {
    float f;
    std::memcpy(&f, loss.data(), 4);
    loss_value = f;
  }
  std::ofstream out(argv[2], std::ios::binary);
  emu::write(out, info, 4);
  emu::write(out, &loss_value, 1);
  emu::write(out, reinterpret_cast<const double*>(state.data()), static_cast<size_t>(n * kStateCols));
  emu::write(out, grad.data(), logits_bytes);
  return out ? 0 : 1;
}
