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

std::string quote_token(const char* p, size_t n) {
  constexpr size_t kMax = 24;
  std::string s(p, std::min(n, kMax));
  if (n > kMax) s += "...";
  return "'" + s + "'";
}

std::string where(const RleText& t) {
  return t.item >= 0 ? "rles[" + std::to_string(t.item) + "]: " : std::string();
}

void parse_one(const RleText& text, int64_t height, int64_t width, Style style, std::vector<Run>& runs) {
  const int64_t area = height * width;
  const char* p = text.data;
  const char* const end = text.data + text.size;

  // Collect token boundaries first: "-1" alone means an empty mask, anywhere else it is an error.
  std::vector<std::pair<const char*, size_t>> tokens;
  while (p < end) {
    while (p < end && is_space(*p)) ++p;
    const char* start = p;
    while (p < end && !is_space(*p)) ++p;
    if (p > start) tokens.emplace_back(start, static_cast<size_t>(p - start));
  }
  if (tokens.empty()) return;
  if (tokens.size() == 1 && tokens[0].second == 2 && std::memcmp(tokens[0].first, "-1", 2) == 0) return;

  std::vector<int64_t> values(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    const auto [tp, tn] = tokens[i];
    const bool negative = tp[0] == '-' && tn > 1 &&
                          std::all_of(tp + 1, tp + tn, [](char c) { return c >= '0' && c <= '9'; });
    if (negative) {
      fail_rle(where(text) + "token " + std::to_string(i) + " (" + quote_token(tp, tn) +
               ") is negative; only a lone -1 (empty mask) may be negative");
    }
    int64_t v = 0;
    for (size_t c = 0; c < tn; ++c) {
      if (tp[c] < '0' || tp[c] > '9') {
        fail_rle(where(text) + "token " + std::to_string(i) + " (" + quote_token(tp, tn) +
                 ") is not a non-negative integer");
      }
      if (v > (int64_t(1) << 58)) {
        fail_rle(where(text) + "token " + std::to_string(i) + " (" + quote_token(tp, tn) + ") is too large");
      }
      v = v * 10 + (tp[c] - '0');
    }
    values[i] = v;
  }
  if (values.size() % 2 != 0) {
    fail_rle(where(text) + "odd number of values (" + std::to_string(values.size()) +
             "); an RLE is start/length pairs");
  }

  int64_t cursor = 0;  // end of the previous run (Siim style)
  for (size_t i = 0; i < values.size(); i += 2) {
    const int64_t a = values[i], len = values[i + 1];
    int64_t start;
    if (style == Style::Siim) {
      start = cursor + a;
    } else {
      if (a == 0) {
        fail_rle(where(text) + "token " + std::to_string(i) +
                 " is start 0, but absolute-style starts are 1-based");
      }
      start = a - 1;
    }
    // a and len are < 2^59 each, so the sums cannot overflow int64.
    if (start + len > area) {
      fail_rle(where(text) + "run " + std::to_string(i / 2) + " (tokens " + std::to_string(i) + "-" +
               std::to_string(i + 1) + ": " + std::to_string(a) + " " + std::to_string(len) +
               ") covers pixels [" + std::to_string(start) + ", " + std::to_string(start + len) +
               ") and leaves the " + std::to_string(height) + "x" + std::to_string(width) + " image (" +
               std::to_string(area) + " pixels)");
    }
    if (len > 0) runs.push_back(Run{text.image, start, start + len});
    cursor = start + len;
  }
}

// ---------------------------------------------------------------------------------------------
// Fast CPU encoder: row-by-row differences (vectorisable, contiguous reads), then a counting sort
// of the few transitions by column to put them in column-major order.

template <typename T>
void find_transitions(const T* image, int64_t H, int64_t W, int64_t sh, int64_t sw, std::vector<int64_t>& out) {
  std::vector<uint8_t> prev(W, 0), diff(W, 0);
  std::vector<int32_t> hit_col, hit_row;  // transitions in row-major discovery order
  hit_col.reserve(1024);
  hit_row.reserve(1024);
  for (int64_t r = 0; r <= H; ++r) {
    uint8_t any = 0;
    if (r < H) {
      const T* row = image + r * sh;
      if (sw == 1) {
        for (int64_t c = 0; c < W; ++c) {
          const uint8_t cur = is_nonzero<T>(row[c]);
          diff[c] = cur ^ prev[c];
          prev[c] = cur;
        }
      } else {
        for (int64_t c = 0; c < W; ++c) {
          const uint8_t cur = is_nonzero<T>(row[c * sw]);
          diff[c] = cur ^ prev[c];
          prev[c] = cur;
        }
      }
      for (int64_t c = 0; c < W; ++c) any |= diff[c];
    } else {  // a virtual background row closes the runs that reach the bottom of their column
      std::memcpy(diff.data(), prev.data(), W);
      for (int64_t c = 0; c < W; ++c) any |= diff[c];
    }
    if (!any) continue;
    int64_t c = 0;
    for (; c + 8 <= W; c += 8) {
      uint64_t word;
      std::memcpy(&word, diff.data() + c, 8);
      while (word) {
        const int byte = __builtin_ctzll(word) >> 3;
        hit_col.push_back(static_cast<int32_t>(c + byte));
        hit_row.push_back(static_cast<int32_t>(r));
        word &= word - 1;  // diff bytes are 0 or 1: this clears exactly the byte just taken
      }
    }
    for (; c < W; ++c) {
      if (diff[c]) {
        hit_col.push_back(static_cast<int32_t>(c));
        hit_row.push_back(static_cast<int32_t>(r));
      }
    }
  }

  // Counting sort by column; rows stay ascending within a column because they were found in order.
  std::vector<int64_t> first(W + 1, 0);
  for (int32_t c : hit_col) ++first[c + 1];
  for (int64_t c = 0; c < W; ++c) first[c + 1] += first[c];
  std::vector<int32_t> rows(hit_row.size());
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (size_t i = 0; i < hit_col.size(); ++i) rows[fill[hit_col[i]]++] = hit_row[i];

  out.clear();
  out.reserve(rows.size());
  for (int64_t c = 0; c < W; ++c) {
    for (int64_t i = first[c]; i < first[c + 1]; ++i) {
      const int64_t k = c * H + rows[i];
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

void format_transitions(const std::vector<int64_t>& t, Style style, std::string& s) {
  s.clear();
  if (t.empty()) {
    if (style == Style::Siim) s = "-1";
    return;
  }
  // Every number is at most as long as the pixel count, plus its separator. The worst-case buffer
  // is left uninitialised (every byte used is written), unlike std::string::resize.
  const int widest = decimal_digits(static_cast<uint64_t>(t.back()) + 1) + 1;
  std::unique_ptr<char[]> buffer(new char[t.size() * widest]);
  char* p = buffer.get();
  for (size_t j = 0; j < t.size(); ++j) {
    if (j > 0) *p++ = ' ';
    const uint64_t v = transition_number(style, static_cast<int64_t>(j), t[j], j > 0 ? t[j - 1] : -1);
    const int d = decimal_digits(v);
    write_decimal(p, v, d);
    p += d;
  }
  s.assign(buffer.get(), p);
}

void check_batch(const TensorView& masks) {
  check_ndim(masks, 3, "masks");
  check_device(masks, Device::CPU, "masks");
  if (masks.shape[1] * masks.shape[2] >= (int64_t(1) << 31)) {
    fail_value("masks: images of 2^31 pixels or more are not supported");
  }
}

void join(std::vector<std::string>& parts, EncodedBatch& out) {
  if (parts.size() == 1) {  // the common single-mask call: no copy
    out.chars = std::move(parts[0]);
    out.offsets = {0, static_cast<int64_t>(out.chars.size())};
    return;
  }
  size_t total = 0;
  for (auto& p : parts) total += p.size();
  out.chars.clear();
  out.chars.reserve(total);
  out.offsets.assign(1, 0);
  for (auto& p : parts) {
    out.chars += p;
    out.offsets.push_back(static_cast<int64_t>(out.chars.size()));
  }
}

}  // namespace

void parse_runs(const std::vector<RleText>& texts, int64_t height, int64_t width, Style style,
                std::vector<Run>& runs) {
  if (height < 0 || width < 0) fail_rle("shape must be non-negative");
  for (const auto& t : texts) parse_one(t, height, width, style, runs);
}

void paint_runs_cpu(const std::vector<Run>& runs, const TensorView& out) {
  check_ndim(out, 3, "out");
  check_device(out, Device::CPU, "out");
  if (out.dtype != DType::UInt8) fail_value("out must be uint8");
  const int64_t N = out.shape[0], H = out.shape[1], W = out.shape[2];
  for (const Run& run : runs) {
    // Checked again here: this function writes, so it trusts no caller.
    if (run.image < 0 || run.image >= N || run.start < 0 || run.end > H * W || run.start > run.end) {
      throw NativeError("paint_runs_cpu: run outside the output");
    }
  }
  // Runs are column-major but the output is row-major: writing them pixel by pixel touches a new
  // cache line per pixel. Instead each column piece of a run becomes a +1 at its first row and a -1
  // after its last, and rows are swept top to bottom with a per-column coverage count, writing
  // contiguous rows. Overlapping annotations (a union) simply add up.
  std::vector<int64_t> by_image(N + 1, 0);
  for (const Run& run : runs) ++by_image[run.image + 1];
  for (int64_t n = 0; n < N; ++n) by_image[n + 1] += by_image[n];
  std::vector<const Run*> ordered(runs.size());
  {
    std::vector<int64_t> fill(by_image.begin(), by_image.end() - 1);
    for (const Run& run : runs) ordered[fill[run.image]++] = &run;
  }
  std::vector<int64_t> row_first(H + 2);
  std::vector<int32_t> event_col;
  std::vector<int8_t> event_delta;
  std::vector<int32_t> coverage(W);
  for (int64_t n = 0; n < N; ++n) {
    if (by_image[n] == by_image[n + 1]) continue;
    // Bucket the events by row (counting sort), remembering the columns they touch.
    std::fill(row_first.begin(), row_first.end(), 0);
    int64_t col_lo = W, col_hi = -1;
    auto for_each_piece = [&](auto&& f) {
      for (int64_t i = by_image[n]; i < by_image[n + 1]; ++i) {
        for (int64_t k = ordered[i]->start; k < ordered[i]->end;) {
          const int64_t c = k / H, r0 = k % H, r1 = std::min(H, r0 + (ordered[i]->end - k));
          f(c, r0, r1);
          k += r1 - r0;
        }
      }
    };
    for_each_piece([&](int64_t c, int64_t r0, int64_t r1) {
      ++row_first[r0 + 1];
      ++row_first[r1 + 1];
      col_lo = std::min(col_lo, c);
      col_hi = std::max(col_hi, c);
    });
    for (int64_t r = 0; r <= H; ++r) row_first[r + 1] += row_first[r];
    event_col.resize(row_first[H + 1]);
    event_delta.resize(row_first[H + 1]);
    std::vector<int64_t> fill(row_first.begin(), row_first.end() - 1);
    for_each_piece([&](int64_t c, int64_t r0, int64_t r1) {
      event_col[fill[r0]] = static_cast<int32_t>(c);
      event_delta[fill[r0]++] = 1;
      event_col[fill[r1]] = static_cast<int32_t>(c);
      event_delta[fill[r1]++] = -1;
    });

    std::fill(coverage.begin(), coverage.end(), 0);
    int64_t covered = 0;  // columns with coverage > 0
    uint8_t* image = static_cast<uint8_t*>(out.data) + n * out.strides[0];
    const int64_t sh = out.strides[1], sw = out.strides[2];
    for (int64_t r = 0; r < H; ++r) {
      for (int64_t e = row_first[r]; e < row_first[r + 1]; ++e) {
        int32_t& cov = coverage[event_col[e]];
        const bool was = cov > 0;
        cov += event_delta[e];
        covered += (cov > 0) - was;
      }
      if (covered == 0) continue;
      uint8_t* row = image + r * sh;
      const int32_t* cov = coverage.data();
      if (sw == 1) {
        for (int64_t c = col_lo; c <= col_hi; ++c) row[c] = cov[c] > 0;
      } else {
        for (int64_t c = col_lo; c <= col_hi; ++c) row[c * sw] = cov[c] > 0;
      }
    }
  }
}

void encode_cpu(const TensorView& masks, Style style, EncodedBatch& out) {
  check_batch(masks);
  const int64_t N = masks.shape[0], H = masks.shape[1], W = masks.shape[2];
  std::vector<std::string> parts(N);
  PNEUMOSEG_DISPATCH_ALL(masks.dtype, "masks", [&] {
    const auto* base = static_cast<const scalar_t*>(masks.data);
    // Threads pay off only when each gets a few megapixels.
    parallel_for(N, std::max<int64_t>(1, (int64_t(4) << 20) / std::max<int64_t>(1, H * W)), [&](int64_t n) {
      std::vector<int64_t> t;
      if (H > 0 && W > 0) {
        find_transitions(base + n * masks.strides[0], H, W, masks.strides[1], masks.strides[2], t);
      }
      format_transitions(t, style, parts[n]);
    });
  });
  join(parts, out);
}

void encode_units_cpu(const TensorView& masks, Style style, EncodedBatch& out) {
  check_batch(masks);
  const int64_t N = masks.shape[0], H = masks.shape[1], W = masks.shape[2];
  const int64_t S = units_per_column(H), U = S * W;
  std::vector<std::string> parts(N);
  PNEUMOSEG_DISPATCH_ALL(masks.dtype, "masks", [&] {
    const auto* base = static_cast<const scalar_t*>(masks.data);
    for (int64_t n = 0; n < N; ++n) {
      ColumnMajorMask<scalar_t> m{base + n * masks.strides[0], H, W, masks.strides[1], masks.strides[2]};
      // Pass A: transitions per unit and the last one of each.
      std::vector<int64_t> count(U, 0), last(U, -1);
      for (int64_t u = 0; u < U; ++u) {
        walk_unit(m, u / S, u % S, [&](int64_t k) {
          ++count[u];
          last[u] = k;
        });
      }
      // Scans: where each unit's transitions fall in the string, and the transition before them.
      std::vector<int64_t> first_j(U), prev_k(U);
      int64_t run_j = 0, run_last = -1;
      for (int64_t u = 0; u < U; ++u) {
        first_j[u] = run_j;
        prev_k[u] = run_last;
        run_j += count[u];
        run_last = std::max(run_last, last[u]);
      }
      // Pass B: characters per unit; scan; pass C: write.
      std::vector<int64_t> chars(U, 0), first_char(U);
      for (int64_t u = 0; u < U; ++u) {
        int64_t j = first_j[u], prev = prev_k[u];
        walk_unit(m, u / S, u % S, [&](int64_t k) {
          chars[u] += transition_chars(style, j++, k, prev);
          prev = k;
        });
      }
      int64_t total = 0;
      for (int64_t u = 0; u < U; ++u) {
        first_char[u] = total;
        total += chars[u];
      }
      std::string& s = parts[n];
      if (total == 0) {
        s = style == Style::Siim ? "-1" : "";
        continue;
      }
      s.assign(total, '?');
      for (int64_t u = 0; u < U; ++u) {
        int64_t j = first_j[u], prev = prev_k[u], pos = first_char[u];
        walk_unit(m, u / S, u % S, [&](int64_t k) {
          const uint64_t v = transition_number(style, j, k, prev);
          const int d = decimal_digits(v);
          if (pos + d + (j > 0) > total) throw NativeError("encode_units_cpu: write past the string");
          if (j > 0) s[pos++] = ' ';
          write_decimal(&s[pos], v, d);
          pos += d;
          prev = k;
          ++j;
        });
      }
    }
  });
  join(parts, out);
}

}  // namespace pneumoseg::rle
