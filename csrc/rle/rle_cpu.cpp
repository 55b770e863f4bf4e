#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/dispatch.h"
#include "common/errors.h"
#include "common/parallel.h"
#include "rle/rle.h"
#include "rle/rle_units.h"

namespace pneumoseg::rle {
namespace {

// ---------------------------------------------------------------------------------------------
// Parsing

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

// A token for an error message: its first bytes, with every byte outside printable ASCII written as
// \xHH, so the message is always valid text (a raw byte could be invalid UTF-8, a control character or
// a NUL) and shows exactly what was given.
std::string quote_token(const char* p, size_t n) {
  constexpr size_t kMax = 24;
  static const char kHex[] = "0123456789abcdef";
  std::string s = "'";
  for (size_t i = 0; i < std::min(n, kMax); ++i) {
    const auto byte = static_cast<unsigned char>(p[i]);
    if (byte >= 0x20 && byte < 0x7f) {
      s += static_cast<char>(byte);
    } else {
      s += "\\x";
      s += kHex[byte >> 4];
      s += kHex[byte & 15];
    }
  }
  if (n > kMax) s += "...";
  return s + "'";
}

std::string where(const RleText& t) {
  return t.item >= 0 ? "rles[" + std::to_string(t.item) + "]: " : std::string();
}

// The next whitespace-separated token at or after p (advancing p past it); false at the end.
bool next_token(const char*& p, const char* end, const char*& token, size_t& size) {
  while (p < end && is_space(*p)) ++p;
  if (p == end) return false;
  token = p;
  while (p < end && !is_space(*p)) ++p;
  size = static_cast<size_t>(p - token);
  return true;
}

int64_t parse_value(const RleText& text, size_t index, const char* tp, size_t tn) {
  const bool negative = tp[0] == '-' && tn > 1 &&
                        std::all_of(tp + 1, tp + tn, [](char c) { return c >= '0' && c <= '9'; });
  if (negative) {
    fail_rle(where(text) + "token " + std::to_string(index) + " (" + quote_token(tp, tn) +
             ") is negative; only a lone -1 (empty mask) may be negative");
  }
  int64_t v = 0;
  for (size_t c = 0; c < tn; ++c) {
    if (tp[c] < '0' || tp[c] > '9') {
      fail_rle(where(text) + "token " + std::to_string(index) + " (" + quote_token(tp, tn) +
               ") is not a non-negative integer");
    }
    if (v > (int64_t(1) << 58)) {
      fail_rle(where(text) + "token " + std::to_string(index) + " (" + quote_token(tp, tn) + ") is too large");
    }
    v = v * 10 + (tp[c] - '0');
  }
  return v;
}

// One pass over the text, no token list: memory for the runs only.
void parse_one(const RleText& text, int64_t height, int64_t width, int64_t area, Style style,
               std::vector<Run>& runs) {
  const char* p = text.data;
  const char* const end = text.data + text.size;
  const char* tp = nullptr;
  size_t tn = 0;
  if (!next_token(p, end, tp, tn)) return;  // empty or blank: an empty mask
  if (tn == 2 && std::memcmp(tp, "-1", 2) == 0) {
    const char* q = p;
    const char* other = nullptr;
    size_t other_size = 0;
    if (!next_token(q, end, other, other_size)) return;  // a lone -1: an empty mask
    // Anything after it: parse_value reports token 0 as negative.
  }
  int64_t cursor = 0;  // end of the previous run (Siim style)
  for (size_t i = 0;; i += 2) {
    const int64_t a = parse_value(text, i, tp, tn);
    const char* lp = nullptr;
    size_t ln = 0;
    if (!next_token(p, end, lp, ln)) {
      fail_rle(where(text) + "odd number of values (" + std::to_string(i + 1) + "); an RLE is start/length pairs");
    }
    const int64_t len = parse_value(text, i + 1, lp, ln);
    int64_t start;
    if (style == Style::Siim) {
      start = cursor + a;
    } else {
      if (a == 0) {
        fail_rle(where(text) + "token " + std::to_string(i) + " is start 0, but absolute-style starts are 1-based");
      }
      start = a - 1;
    }
    // A token is at most 2^58 * 10 + 9 (about 2^61.3) and cursor <= area <= 2^62, so start < 2^63,
    // but start + len can pass 2^63 in images of more than 2^61 pixels: the addition is checked.
    int64_t run_end = 0;
    if (__builtin_add_overflow(start, len, &run_end) || run_end > area) {
      fail_rle(where(text) + "run " + std::to_string(i / 2) + " (tokens " + std::to_string(i) + "-" +
               std::to_string(i + 1) + ": " + std::to_string(a) + " " + std::to_string(len) + ") covers pixels [" +
               std::to_string(start) + ", " +
               std::to_string(static_cast<uint64_t>(start) + static_cast<uint64_t>(len)) + ") and leaves the " +
               std::to_string(height) + "x" + std::to_string(width) + " image (" + std::to_string(area) + " pixels)");
    }
    if (len > 0) {
      // A run touching the previous one of the same string (a zero gap) extends it.
      if (!runs.empty() && runs.back().image == text.image && runs.back().end == start) {
        runs.back().end = run_end;
      } else {
        runs.push_back(Run{text.image, start, run_end});
      }
    }
    cursor = run_end;
    if (!next_token(p, end, tp, tn)) break;
  }
}

// ---------------------------------------------------------------------------------------------
// CPU encoder: row-by-row differences over a strip of columns (vectorisable, contiguous reads), then
// a counting sort of the few transitions by column to put them in column-major order, formatted
// straight away. A strip covers at most kStripPixels pixels, so the transition lists stay small
// however large the mask; a 1024 x 1024 mask is a single strip.

constexpr int64_t kStripPixels = int64_t(1) << 20;

// A growable array of trivially copyable values with room handed out before it is filled: the loop
// that fills it then calls nothing and keeps its counters in registers.
template <typename V>
class Appender {
 public:
  // Space for at least n more values after the current end.
  V* room(size_t n) {
    if (size_ + n > capacity_) {
      const size_t capacity = std::max(size_ + n, 2 * capacity_ + 1024);
      std::unique_ptr<V[]> grown(new V[capacity]);
      if (size_) std::memcpy(grown.get(), data_.get(), size_ * sizeof(V));
      data_ = std::move(grown);
      capacity_ = capacity;
    }
    return data_.get() + size_;
  }
  void commit(size_t n) { size_ += n; }
  size_t size() const { return size_; }
  const V* data() const { return data_.get(); }

 private:
  std::unique_ptr<V[]> data_;
  size_t size_ = 0, capacity_ = 0;
};

// Transitions of columns [c0, c1) in column-major order, into `out`. Rows are held in 32 bits, half
// the memory traffic of 64 (masks of 2^32 rows or more are refused).
template <typename T>
void strip_transitions(const T* image, int64_t H, int64_t sh, int64_t sw, int64_t c0, int64_t c1,
                       std::vector<int64_t>& out) {
  const int64_t W = c1 - c0;
  std::vector<uint8_t> prev(W, 0), diff(W, 0);
  Appender<int32_t> hit_col;   // column within the strip
  Appender<uint32_t> hit_row;  // transitions in row-major discovery order
  for (int64_t r = 0; r <= H; ++r) {
    uint8_t* d = diff.data();
    uint8_t* p = prev.data();
    uint8_t any = 0;
    if (r < H) {
      const T* row = image + r * sh + c0 * sw;
      if (sw == 1) {
        for (int64_t c = 0; c < W; ++c) {
          const uint8_t cur = is_nonzero<T>(row[c]);
          d[c] = cur ^ p[c];
          p[c] = cur;
        }
      } else {
        for (int64_t c = 0; c < W; ++c) {
          const uint8_t cur = is_nonzero<T>(row[c * sw]);
          d[c] = cur ^ p[c];
          p[c] = cur;
        }
      }
    } else {  // a virtual background row closes the runs that reach the bottom of their column
      std::memcpy(d, p, W);
    }
    for (int64_t c = 0; c < W; ++c) any |= d[c];
    if (!any) continue;
    int32_t* const cols_begin = hit_col.room(W);
    uint32_t* rows = hit_row.room(W);
    int32_t* cols = cols_begin;
    const uint32_t row_index = static_cast<uint32_t>(r);
    int64_t c = 0;
    for (; c + 8 <= W; c += 8) {
      uint64_t word;
      std::memcpy(&word, d + c, 8);
      while (word) {
        const int byte = __builtin_ctzll(word) >> 3;
        *cols++ = static_cast<int32_t>(c + byte);
        *rows++ = row_index;
        word &= word - 1;  // diff bytes are 0 or 1: this clears exactly the byte just taken
      }
    }
    for (; c < W; ++c) {
      if (d[c]) {
        *cols++ = static_cast<int32_t>(c);
        *rows++ = row_index;
      }
    }
    hit_col.commit(cols - cols_begin);
    hit_row.commit(cols - cols_begin);
  }

  // Counting sort by column; rows stay ascending within a column because they were found in order.
  const size_t n = hit_col.size();
  const int32_t* hc = hit_col.data();
  const uint32_t* hr = hit_row.data();
  std::vector<int64_t> first(W + 1, 0);
  for (size_t i = 0; i < n; ++i) ++first[hc[i] + 1];
  for (int64_t c = 0; c < W; ++c) first[c + 1] += first[c];
  std::vector<uint32_t> rows(n);
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (size_t i = 0; i < n; ++i) rows[fill[hc[i]]++] = hr[i];
  out.clear();
  out.reserve(n);
  for (int64_t c = 0; c < W; ++c) {
    for (int64_t i = first[c]; i < first[c + 1]; ++i) {
      const int64_t k = (c0 + c) * H + rows[i];
      // A run that reaches the bottom of column c-1 and goes on at the top of column c ends and
      // restarts at the same k: in column-major order it is one run, so the two cancel.
      if (!out.empty() && out.back() == k) {
        out.pop_back();
      } else {
        out.push_back(k);
      }
    }
  }
}

// Turns column-major transitions into the RLE text, a strip at a time. Within a strip, runs that
// continue from one column into the next were already joined (strip_transitions); across strips, the
// last transition of a strip is held back until the next strip's first shows whether it cancels.
class TextWriter {
 public:
  TextWriter(Style style, int64_t pixels)
      : style_(style), widest_(decimal_digits(static_cast<uint64_t>(pixels) + 1) + 1) {}

  // Formats `t` (after the held-back transition) as the next piece of the text.
  void add(const std::vector<int64_t>& t, std::vector<std::string>& pieces) {
    if (t.empty()) return;
    const size_t need = (t.size() + 1) * static_cast<size_t>(widest_);
    if (buffer_size_ < need) {
      buffer_.reset(new char[need]);  // uninitialised: every byte used is written
      buffer_size_ = need;
    }
    char* const begin = buffer_.get();
    char* p = begin;
    // The state lives in locals while formatting: stores through a char pointer may alias
    // anything, so members would be reloaded and stored on every number.
    const Style style = style_;
    int64_t j = j_, prev = prev_;
    size_t i = 0;
    if (held_ && t[0] == pending_) {
      i = 1;  // the held run end and this run start are the same pixel: one run goes on
    } else if (held_) {
      p = emit(p, style, j++, pending_, prev);
      prev = pending_;
    }
    held_ = false;
    const size_t last = t.size() - 1;
    for (; i < last; ++i) {
      p = emit(p, style, j++, t[i], prev);
      prev = t[i];
    }
    if (i == last) {
      pending_ = t[last];
      held_ = true;
    }
    j_ = j, prev_ = prev;
    if (p > begin) {
      // Room for the held-back number, so finish() never reallocates a large piece.
      std::string piece;
      piece.reserve(static_cast<size_t>(p - begin) + widest_);
      piece.assign(begin, p);
      pieces.push_back(std::move(piece));
    }
  }

  void finish(std::vector<std::string>& pieces) {
    if (held_) {
      char small[48];
      char* p = emit(small, style_, j_, pending_, prev_);
      ++j_;
      held_ = false;
      if (pieces.empty()) {
        pieces.emplace_back(small, p);
      } else {
        pieces.back().append(small, p);
      }
    }
    if (j_ == 0 && style_ == Style::Siim) pieces.emplace_back("-1");
  }

 private:
  // Writes the number of transition j at k (with its separating space); returns the new end.
  static char* emit(char* p, Style style, int64_t j, int64_t k, int64_t prev) {
    if (j > 0) *p++ = ' ';
    const uint64_t v = transition_number(style, j, k, prev);
    const int d = decimal_digits(v);
    write_decimal(p, v, d);
    return p + d;
  }

  Style style_;
  int widest_;
  std::unique_ptr<char[]> buffer_;
  size_t buffer_size_ = 0;
  int64_t j_ = 0, prev_ = -1, pending_ = 0;
  bool held_ = false;
};

template <typename T>
void encode_image(const T* image, int64_t H, int64_t W, int64_t sh, int64_t sw, Style style,
                  std::vector<std::string>& pieces) {
  TextWriter writer(style, H * W);
  if (H > 0 && W > 0) {
    const int64_t strip = std::max<int64_t>(1, std::min<int64_t>(W, kStripPixels / H));
    std::vector<int64_t> t;
    for (int64_t c0 = 0; c0 < W; c0 += strip) {
      strip_transitions(image, H, sh, sw, c0, std::min(W, c0 + strip), t);
      writer.add(t, pieces);
    }
  }
  writer.finish(pieces);
}

void check_batch(const TensorView& masks) {
  check_ndim(masks, 3, "masks");
  check_device(masks, Device::CPU, "masks");
  int64_t pixels = 0;
  if (__builtin_mul_overflow(masks.shape[1], masks.shape[2], &pixels) || pixels > (int64_t(1) << 62)) {
    fail_value("masks: images of 2^62 pixels or more are not supported");
  }
  if (masks.shape[1] >= (int64_t(1) << 32)) fail_value("masks: images of 2^32 rows or more are not supported");
}

// One piece list per image -> the batch layout.
void join(std::vector<std::vector<std::string>>& parts, EncodedBatch& out) {
  size_t total = 0;
  for (auto& p : parts) total += p.size();
  out.pieces.clear();
  out.pieces.reserve(total);
  out.first.assign(1, 0);
  for (auto& p : parts) {
    for (auto& piece : p) out.pieces.push_back(std::move(piece));
    out.first.push_back(static_cast<int64_t>(out.pieces.size()));
    std::vector<std::string>().swap(p);
  }
}

}  // namespace

void normalize_runs(std::vector<Run>& runs) {
  const auto before = [](const Run& a, const Run& b) { return a.image != b.image ? a.image < b.image : a.start < b.start; };
  bool ordered = true;
  for (size_t i = 1; i < runs.size() && ordered; ++i) {
    ordered = runs[i - 1].image < runs[i].image || (runs[i - 1].image == runs[i].image && runs[i - 1].end <= runs[i].start);
  }
  if (!ordered) std::sort(runs.begin(), runs.end(), before);
  size_t kept = 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    if (kept > 0 && runs[kept - 1].image == runs[i].image && runs[i].start <= runs[kept - 1].end) {
      runs[kept - 1].end = std::max(runs[kept - 1].end, runs[i].end);
    } else {
      runs[kept++] = runs[i];
    }
  }
  runs.resize(kept);
}

void parse_runs(const std::vector<RleText>& texts, int64_t height, int64_t width, Style style,
                std::vector<Run>& runs) {
  if (height < 0 || width < 0) fail_rle("shape must be non-negative");
  int64_t area = 0;
  if (__builtin_mul_overflow(height, width, &area) || area > (int64_t(1) << 62)) {
    fail_rle("shape " + std::to_string(height) + "x" + std::to_string(width) + " is too large");
  }
  // Unions of many overlapping annotations are merged as they come, so the run list stays about
  // the size of the union (plus one string's runs) instead of growing with the number of strings.
  size_t compact_at = size_t(1) << 20;
  for (const auto& t : texts) {
    parse_one(t, height, width, area, style, runs);
    if (runs.size() > compact_at) {
      normalize_runs(runs);
      compact_at = std::max(compact_at, 2 * runs.size());
    }
  }
  normalize_runs(runs);
}

void paint_runs_cpu(const std::vector<Run>& runs, const TensorView& out) {
  check_ndim(out, 3, "out");
  check_device(out, Device::CPU, "out");
  if (out.dtype != DType::UInt8) fail_value("out must be uint8");
  const int64_t N = out.shape[0], H = out.shape[1], W = out.shape[2];
  int64_t area = 0;
  if (__builtin_mul_overflow(H, W, &area)) fail_value("out: image size overflows");
  // Checked here again, before anything is written: this function writes, so it trusts no caller.
  for (size_t i = 0; i < runs.size(); ++i) {
    const Run& run = runs[i];
    if (run.image < 0 || run.image >= N || run.start < 0 || run.end > area || run.start >= run.end) {
      throw NativeError("paint_runs_cpu: run outside the output");
    }
    if (i > 0 && (runs[i - 1].image > run.image || (runs[i - 1].image == run.image && runs[i - 1].end > run.start))) {
      throw NativeError("paint_runs_cpu: runs are not normalised");
    }
  }
  if (runs.empty()) return;  // nothing is allocated for an empty answer, whatever its shape
  // Runs are column-major but the output is row-major: writing them pixel by pixel touches a new
  // cache line per pixel. Instead each column piece of a run becomes a +1 at its first row and a -1
  // after its last, and rows are swept top to bottom with a per-column coverage flag, writing
  // contiguous rows. Runs are disjoint (normalised), so a column is covered at most once at a time.
  // Scratch is sized by the rows and the span of columns the runs touch, never by the whole batch.
  std::vector<int64_t> row_first;
  std::vector<int64_t> event_col;
  std::vector<int8_t> event_delta;
  std::vector<int8_t> coverage;
  std::vector<int64_t> fill;
  size_t begin = 0;
  while (begin < runs.size()) {
    const int64_t n = runs[begin].image;
    size_t end = begin;
    while (end < runs.size() && runs[end].image == n) ++end;
    auto for_each_piece = [&](auto&& f) {
      for (size_t i = begin; i < end; ++i) {
        for (int64_t k = runs[i].start; k < runs[i].end;) {
          const int64_t c = k / H, r0 = k % H, r1 = std::min(H, r0 + (runs[i].end - k));
          f(c, r0, r1);
          k += r1 - r0;
        }
      }
    };
    // Bucket the events by row (counting sort), remembering the columns they touch.
    row_first.assign(H + 2, 0);
    const int64_t col_lo = runs[begin].start / H, col_hi = (runs[end - 1].end - 1) / H;
    for_each_piece([&](int64_t, int64_t r0, int64_t r1) {
      ++row_first[r0 + 1];
      ++row_first[r1 + 1];
    });
    for (int64_t r = 0; r <= H; ++r) row_first[r + 1] += row_first[r];
    event_col.resize(row_first[H + 1]);
    event_delta.resize(row_first[H + 1]);
    fill.assign(row_first.begin(), row_first.end() - 1);
    for_each_piece([&](int64_t c, int64_t r0, int64_t r1) {
      event_col[fill[r0]] = c - col_lo;
      event_delta[fill[r0]++] = 1;
      event_col[fill[r1]] = c - col_lo;
      event_delta[fill[r1]++] = -1;
    });

    const int64_t span = col_hi - col_lo + 1;
    coverage.assign(span, 0);
    int64_t covered = 0;  // columns covered in the current row
    uint8_t* image = static_cast<uint8_t*>(out.data) + n * out.strides[0];
    const int64_t sh = out.strides[1], sw = out.strides[2];
    for (int64_t r = 0; r < H; ++r) {
      for (int64_t e = row_first[r]; e < row_first[r + 1]; ++e) {
        coverage[event_col[e]] += event_delta[e];
        covered += event_delta[e];
      }
      if (covered == 0) continue;
      uint8_t* row = image + r * sh + col_lo * sw;
      const int8_t* cov = coverage.data();
      if (sw == 1) {
        for (int64_t c = 0; c < span; ++c) row[c] = static_cast<uint8_t>(cov[c]);
      } else {
        for (int64_t c = 0; c < span; ++c) row[c * sw] = static_cast<uint8_t>(cov[c]);
      }
    }
    begin = end;
  }
}

void encode_cpu(const TensorView& masks, Style style, EncodedBatch& out) {
  check_batch(masks);
  const int64_t N = masks.shape[0], H = masks.shape[1], W = masks.shape[2];
  std::vector<std::vector<std::string>> parts(N);
  PNEUMOSEG_DISPATCH_ALL(masks.dtype, "masks", [&] {
    const auto* base = static_cast<const scalar_t*>(masks.data);
    // Threads pay off only when each gets a few megapixels.
    parallel_for(N, std::max<int64_t>(1, (int64_t(4) << 20) / std::max<int64_t>(1, H * W)), [&](int64_t n) {
      encode_image(base + n * masks.strides[0], H, W, masks.strides[1], masks.strides[2], style, parts[n]);
    });
  });
  join(parts, out);
}

void encode_units_cpu(const TensorView& masks, Style style, EncodedBatch& out) {
  check_batch(masks);
  const int64_t N = masks.shape[0], H = masks.shape[1], W = masks.shape[2];
  const int64_t S = units_per_column(H), U = S * W, HW = H * W, slots = N * U;
  std::vector<std::vector<std::string>> parts(N);
  PNEUMOSEG_DISPATCH_ALL(masks.dtype, "masks", [&] {
    const auto* base = static_cast<const scalar_t*>(masks.data);
    auto mask_of = [&](int64_t n) {
      return ColumnMajorMask<scalar_t>{base + n * masks.strides[0], H, W, masks.strides[1], masks.strides[2]};
    };
    // The CUDA encoder's steps, serially, over the whole batch at once (slot = n * U + u).
    // Pass A: transitions per unit, and the last one as a batch key (image * HW + k, -1 for none).
    std::vector<int64_t> count(slots, 0), last_key(slots, -1);
    for (int64_t t = 0; t < slots; ++t) {
      const int64_t n = t / U, u = t % U;
      walk_unit(mask_of(n), u / S, u % S, [&](int64_t k) {
        ++count[t];
        last_key[t] = n * HW + k;
      });
    }
    // Batch-wide exclusive scans: sum of counts and max of keys (see unit_start()).
    std::vector<int64_t> first_j(slots), prev_key(slots);
    int64_t run_j = 0, run_key = -1;
    for (int64_t t = 0; t < slots; ++t) {
      first_j[t] = run_j;
      prev_key[t] = run_key;
      run_j += count[t];
      run_key = std::max(run_key, last_key[t]);
    }
    // Pass B: characters per unit; batch-wide exclusive sum = each unit's first character in the
    // concatenated text; image offsets are the values at each image's first unit.
    std::vector<int64_t> chars(slots, 0), first_char(slots);
    for (int64_t t = 0; t < slots; ++t) {
      const int64_t n = t / U, u = t % U;
      UnitStart st = unit_start(first_j, prev_key, n, U, HW, t);
      walk_unit(mask_of(n), u / S, u % S, [&](int64_t k) {
        chars[t] += transition_chars(style, st.j++, k, st.prev);
        st.prev = k;
      });
    }
    int64_t total = 0;
    for (int64_t t = 0; t < slots; ++t) {
      first_char[t] = total;
      total += chars[t];
    }
    std::string text(total, '?');
    // Pass C: write.
    for (int64_t t = 0; t < slots; ++t) {
      const int64_t n = t / U, u = t % U;
      UnitStart st = unit_start(first_j, prev_key, n, U, HW, t);
      int64_t pos = first_char[t];
      walk_unit(mask_of(n), u / S, u % S, [&](int64_t k) {
        const uint64_t v = transition_number(style, st.j, k, st.prev);
        const int d = decimal_digits(v);
        if (pos + d + (st.j > 0) > total) throw NativeError("encode_units_cpu: write past the string");
        if (st.j > 0) text[pos++] = ' ';
        write_decimal(&text[pos], v, d);
        pos += d;
        st.prev = k;
        ++st.j;
      });
    }
    for (int64_t n = 0; n < N; ++n) {
      const int64_t a = U > 0 ? first_char[n * U] : 0, b = n + 1 < N && U > 0 ? first_char[(n + 1) * U] : total;
      parts[n].emplace_back(a == b ? std::string(style == Style::Siim ? "-1" : "") : text.substr(a, b - a));
    }
  });
  join(parts, out);
}

}  // namespace pneumoseg::rle
