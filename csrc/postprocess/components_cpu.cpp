// Two-pass connected-component labelling with union-find (union by minimum label, path halving).
// Pass 1 scans rows, gives each foreground pixel a provisional label from its already-scanned
// neighbours (a decision tree that avoids redundant unions) and counts pixels per provisional
// label; after resolving the equivalences, pass 2 writes final labels or the filtered mask. Areas
// thus come out of the labelling itself: the area filter needs no second labelling.
#include <algorithm>
#include <string>
#include <thread>
#include <vector>

#include "common/dispatch.h"
#include "common/errors.h"
#include "common/half.h"
#include "common/parallel.h"
#include "postprocess/components.h"
#include "postprocess/foreground.h"

namespace pneumoseg::postprocess {
namespace {

class UnionFind {
 public:
  void reset(size_t capacity) {
    parent_.clear();
    parent_.reserve(capacity);
    parent_.push_back(0);  // label 0 is background
    size_.assign(1, 0);
  }
  int32_t make() {
    const auto l = static_cast<int32_t>(parent_.size());
    parent_.push_back(l);
    size_.push_back(0);
    return l;
  }
  int32_t find(int32_t x) {
    while (parent_[x] != x) {
      parent_[x] = parent_[parent_[x]];
      x = parent_[x];
    }
    return x;
  }
  int32_t merge(int32_t a, int32_t b) {
    a = find(a);
    b = find(b);
    if (a == b) return a;
    if (a < b) {
      parent_[b] = a;
      return a;
    }
    parent_[a] = b;
    return b;
  }
  void count(int32_t l) { ++size_[l]; }
  size_t labels() const { return parent_.size(); }
  // Appends another union-find's labels 1..n-1 as offset + l (a stripe joining the image's forest).
  // Offsets grow with raster order, so parent <= label still holds.
  void absorb(const UnionFind& stripe, int32_t offset) {
    for (size_t l = 1; l < stripe.parent_.size(); ++l) {
      parent_.push_back(stripe.parent_[l] + offset);
      size_.push_back(stripe.size_[l]);
    }
  }
  // Final labels 1..K in order of first appearance, and their areas. parent[i] <= i always holds
  // (union by minimum), so one ascending sweep resolves everything.
  void resolve(std::vector<int32_t>& final_label, std::vector<int64_t>& areas) {
    const size_t n = parent_.size();
    final_label.assign(n, 0);
    areas.clear();
    for (size_t i = 1; i < n; ++i) {
      if (parent_[i] == static_cast<int32_t>(i)) {
        areas.push_back(0);
        final_label[i] = static_cast<int32_t>(areas.size());
      } else {
        final_label[i] = final_label[parent_[i]];
      }
      areas[final_label[i] - 1] += size_[i];
    }
  }

 private:
  std::vector<int32_t> parent_;
  std::vector<int64_t> size_;
};

// Pass 1 over one image: provisional labels into `lab` (H * W), union-find filled.
// Foreground bytes of one row, in a loop the compiler vectorises for the common layouts.
template <typename T>
void row_foreground(const T* row, int64_t W, int64_t sw, const IsForeground<T>& fg, uint8_t* out) {
  if constexpr (std::is_same_v<T, float>) {
    if (sw == 1 && fg.use_threshold) {
      // float v > double t  <=>  v > f or v >= f, f = t rounded to float (no float lies between them).
      const float f = static_cast<float>(fg.threshold);
      if (static_cast<double>(f) > fg.threshold) {
        for (int64_t c = 0; c < W; ++c) out[c] = row[c] >= f;
      } else {
        for (int64_t c = 0; c < W; ++c) out[c] = row[c] > f;
      }
      return;
    }
  }
  if constexpr (std::is_same_v<T, uint8_t>) {
    if (sw == 1 && !fg.use_threshold) {
      for (int64_t c = 0; c < W; ++c) out[c] = row[c] != 0;
      return;
    }
  }
  for (int64_t c = 0; c < W; ++c) out[c] = fg(row[c * sw]);
}

// Rows [row0, row1) only: the stripe's first row looks at nothing above it. Not inlined: compiled on
// its own, the per-pixel loop keeps its counters in registers whatever the caller looks like.
template <typename T>
__attribute__((noinline)) void scan(const T* image, int64_t row0, int64_t row1, int64_t W, int64_t sh, int64_t sw, IsForeground<T> fg,
          int connectivity, int32_t* lab, UnionFind& uf) {
  uf.reset(static_cast<size_t>(std::min<int64_t>((row1 - row0) * W / 2 + 2, int64_t(1) << 20)));
  std::vector<uint8_t> on(W);
  for (int64_t r = row0; r < row1; ++r) {
    row_foreground(image + r * sh, W, sw, fg, on.data());
    int32_t* cur = lab + r * W;
    const int32_t* up = r > row0 ? lab + (r - 1) * W : nullptr;
    for (int64_t c = 0; c < W; ++c) {
      if (!on[c]) {
        cur[c] = 0;
        continue;
      }
      const int32_t b = up ? up[c] : 0;
      const int32_t d = c > 0 ? cur[c - 1] : 0;
      int32_t l;
      if (connectivity == 4) {
        if (b && d) {
          l = uf.merge(b, d);
        } else if (b || d) {
          l = b ? b : d;
        } else {
          l = uf.make();
        }
      } else {
        const int32_t a = (up && c > 0) ? up[c - 1] : 0;
        const int32_t e = (up && c + 1 < W) ? up[c + 1] : 0;  // up-right
        if (b) {
          l = b;  // a, e and d already share b's component
        } else if (e) {
          l = a ? uf.merge(e, a) : (d ? uf.merge(e, d) : e);
        } else if (a) {
          l = a;  // d, if set, is a's vertical neighbour: already merged
        } else if (d) {
          l = d;
        } else {
          l = uf.make();
        }
      }
      cur[c] = l;
      uf.count(l);
    }
  }
}

// One image labelled by `stripes` row stripes in parallel, then joined: the stripes' forests are
// concatenated and the components crossing each stripe boundary united. final[offset[s] + l] is the
// final label (1..K, raster order) of stripe s's provisional label l; lab holds the local labels.
struct ImageLabels {
  std::vector<int32_t> final_label;
  std::vector<int64_t> areas;
  std::vector<int32_t> offset;
  std::vector<int64_t> row0;
};

template <typename T>
void label_image(const T* image, int64_t H, int64_t W, int64_t sh, int64_t sw, IsForeground<T> fg, int connectivity,
                 int32_t* lab, int stripes, ImageLabels& out) {
  stripes = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(stripes, H)));
  out.row0.assign(stripes + 1, 0);
  for (int s = 0; s <= stripes; ++s) out.row0[s] = H * s / stripes;
  std::vector<UnionFind> local(stripes);
  parallel_for(stripes, 1, [&](int64_t s) {
    scan(image, out.row0[s], out.row0[s + 1], W, sh, sw, fg, connectivity, lab, local[s]);
  });
  UnionFind joined;
  joined.reset(1);
  out.offset.assign(stripes, 0);
  for (int s = 0; s < stripes; ++s) {
    out.offset[s] = static_cast<int32_t>(joined.labels()) - 1;
    joined.absorb(local[s], out.offset[s]);
  }
  for (int s = 1; s < stripes; ++s) {
    const int64_t r = out.row0[s];
    if (r >= out.row0[s + 1]) continue;
    const int32_t* cur = lab + r * W;
    const int32_t* up = lab + (r - 1) * W;
    for (int64_t c = 0; c < W; ++c) {
      if (!cur[c]) continue;
      const int32_t me = cur[c] + out.offset[s];
      const int32_t above = out.offset[s - 1];
      if (up[c]) joined.merge(me, up[c] + above);
      if (connectivity == 8) {
        if (c > 0 && up[c - 1]) joined.merge(me, up[c - 1] + above);
        if (c + 1 < W && up[c + 1]) joined.merge(me, up[c + 1] + above);
      }
    }
  }
  joined.resolve(out.final_label, out.areas);
}

// Stripes per image: the spare threads when a batch has fewer images than the machine has cores.
int stripes_for(int64_t images, int64_t pixels) {
  const int64_t hw = hardware_threads();
  if (images >= hw || pixels < (int64_t(1) << 16)) return 1;
  return static_cast<int>(std::max<int64_t>(1, hw / std::max<int64_t>(1, images)));
}

// For each pixel of a stripe-labelled image: out[i] = table[global provisional label], stripes in
// parallel. Everything the loop reads is a local: a store through a byte pointer may alias anything,
// and the compiler would reload the bounds and table pointer on every pixel. Labels outside the
// table read entry 0 and are reported after the loop, so no access is ever out of bounds.
template <typename Out>
void write_from_table(const ImageLabels& il, int64_t W, const int32_t* lab, const Out* table, int64_t table_size,
                      Out* out, const char* where) {
  const int stripes = static_cast<int>(il.offset.size());
  parallel_for(stripes, 1, [&](int64_t s) {
    const int64_t begin = il.row0[s] * W, end = il.row0[s + 1] * W;
    const uint32_t offset = static_cast<uint32_t>(il.offset[s]), size = static_cast<uint32_t>(table_size);
    const int32_t* src = lab;
    const Out* t = table;
    Out* dst = out;
    uint32_t bad = 0;
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t l = static_cast<uint32_t>(src[i]);
      const uint32_t g = l ? l + offset : 0u;
      const uint32_t outside = g >= size;
      bad |= outside;
      dst[i] = t[outside ? 0u : g];
    }
    if (bad) throw NativeError(std::string(where) + ": provisional label out of range");
  });
}

void check_input(const TensorView& input, int connectivity) {
  check_ndim(input, 3, "mask");
  check_device(input, Device::CPU, "mask");
  if (connectivity != 4 && connectivity != 8) {
    fail_value("connectivity must be 4 or 8, got " + std::to_string(connectivity));
  }
  if (input.shape[1] * input.shape[2] >= (int64_t(1) << 31)) fail_value("images of 2^31 pixels or more");
}

void check_output(const TensorView& out, const TensorView& input, DType dtype, const char* name) {
  check_ndim(out, 3, name);
  check_device(out, Device::CPU, name);
  if (out.dtype != dtype) fail_value(std::string(name) + " has the wrong dtype");
  for (int i = 0; i < 3; ++i) {
    if (out.shape[i] != input.shape[i]) fail_value(std::string(name) + " has the wrong shape");
  }
  // An empty array has no memory to lay out (NumPy gives it zero strides): any strides will do.
  if (out.numel() > 0 &&
      (out.strides[2] != 1 || out.strides[1] != out.shape[2] || out.strides[0] != out.shape[1] * out.shape[2])) {
    fail_value(std::string(name) + " must be contiguous");
  }
}

// Label scratch up to this many pixels (16 MB) stays allocated per thread for the next call; larger
// images get a buffer of their own that is freed when the call returns.
constexpr int64_t kKeptScratchPixels = int64_t(1) << 22;

}  // namespace

void label_cpu(const TensorView& input, Foreground fg, int connectivity, const TensorView& labels,
               std::vector<std::vector<int64_t>>& areas) {
  check_input(input, connectivity);
  check_output(labels, input, DType::Int32, "labels");
  const int64_t N = input.shape[0], H = input.shape[1], W = input.shape[2];
  areas.assign(N, {});
  PNEUMOSEG_DISPATCH_ALL(input.dtype, "mask", [&] {
    const auto* base = static_cast<const scalar_t*>(input.data);
    const IsForeground<scalar_t> is_fg{fg.use_threshold, fg.threshold};
    const int stripes = stripes_for(N, H * W);
    parallel_for(N, std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(1, H * W)), [&](int64_t n) {
      int32_t* lab = static_cast<int32_t*>(labels.data) + n * H * W;
      ImageLabels il;
      label_image(base + n * input.strides[0], H, W, input.strides[1], input.strides[2], is_fg, connectivity, lab,
                  stripes, il);
      areas[n] = std::move(il.areas);
      write_from_table(il, W, lab, il.final_label.data(), static_cast<int64_t>(il.final_label.size()), lab,
                       "label_cpu");
    });
  });
}

std::vector<uint8_t> postprocess_cpu(const TensorView& input, const PostprocessParams& p,
                                     const std::vector<uint8_t>& keep_image, const TensorView& out,
                                     int32_t* components) {
  check_input(input, p.connectivity);
  check_output(out, input, DType::UInt8, "out");
  const int64_t N = input.shape[0], H = input.shape[1], W = input.shape[2];
  if (static_cast<int64_t>(keep_image.size()) != N) fail_value("scores: one per image expected");
  std::vector<uint8_t> nonempty(N, 0);
  if (components != nullptr) std::fill(components, components + N, 0);
  // Counting components needs the labelling even where no area filter asks for it; every component
  // has at least one pixel, so a minimum of 1 keeps them all.
  const int64_t min_area = components != nullptr ? std::max<int64_t>(1, p.min_component_area) : p.min_component_area;
  PNEUMOSEG_DISPATCH_ALL(input.dtype, "probs", [&] {
    const auto* base = static_cast<const scalar_t*>(input.data);
    const IsForeground<scalar_t> mask_fg{p.mask.use_threshold, p.mask.threshold};
    const IsForeground<scalar_t> top_fg{true, p.triplet_top};
    const int stripes = stripes_for(N, H * W);
    parallel_for(N, std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(1, H * W)), [&](int64_t n) {
      uint8_t* dst = static_cast<uint8_t*>(out.data) + n * H * W;
      const scalar_t* image = base + n * input.strides[0];
      const int64_t sh = input.strides[1], sw = input.strides[2];
      bool keep = keep_image[n] != 0;
      std::vector<uint8_t> on(W);
      if (keep && p.use_triplet) {
        int64_t above = 0;
        for (int64_t r = 0; r < H; ++r) {
          row_foreground(image + r * sh, W, sw, top_fg, on.data());
          for (int64_t c = 0; c < W; ++c) above += on[c];
        }
        keep = above >= p.triplet_min_area;
      }
      if (!keep) {
        std::fill(dst, dst + H * W, uint8_t(0));
        return;
      }
      int64_t count = 0;
      if (min_area <= 0) {
        for (int64_t r = 0; r < H; ++r) {
          uint8_t* row = dst + r * W;
          row_foreground(image + r * sh, W, sw, mask_fg, row);
          for (int64_t c = 0; c < W; ++c) count += row[c];
        }
      } else {
        // Provisional labels: every pixel is written by the scan, so the buffer needs no zeroing,
        // and reusing it per thread saves the page faults of a fresh 4-byte-per-pixel allocation.
        thread_local std::vector<int32_t> kept;
        std::vector<int32_t> own;
        std::vector<int32_t>& scratch = H * W <= kKeptScratchPixels ? kept : own;
        if (scratch.size() < static_cast<size_t>(H * W)) scratch.resize(H * W);
        int32_t* lab = scratch.data();
        ImageLabels il;
        label_image(image, H, W, sh, sw, mask_fg, p.connectivity, lab, stripes, il);
        // keep[provisional label] so the write pass is one lookup per pixel.
        std::vector<uint8_t> keep_label(il.final_label.size(), 0);
        for (size_t l = 1; l < il.final_label.size(); ++l) {
          keep_label[l] = il.areas[il.final_label[l] - 1] >= min_area;
        }
        write_from_table(il, W, lab, keep_label.data(), static_cast<int64_t>(keep_label.size()), dst,
                         "postprocess_cpu");
        int32_t kept_components = 0;
        for (int64_t a : il.areas) {
          count += a >= min_area ? a : 0;
          kept_components += a >= min_area ? 1 : 0;
        }
        if (components != nullptr) components[n] = kept_components;
      }
      nonempty[n] = count > 0;
    });
  });
  return nonempty;
}

}  // namespace pneumoseg::postprocess
