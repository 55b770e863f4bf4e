// RLE decoding of arbitrary text (csrc/rle: parse_runs + paint_runs_cpu), against a parser written
// here from the format's definition (rle/rle.h, pneumoseg/rle.py), then encode(decode(x)) against a
// reference encoder: a success must paint exactly the pixels the text names, write nothing outside
// the mask, and re-encode to the canonical string, which decodes to the same mask.
//
// Small mode: 1-3 images of 0-12 x 0-12 pixels in any output layout. Huge mode: parse only, into
// fuzzer-chosen shapes up to 2^62 pixels (and negative ones), where the index arithmetic is at risk.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "rle/rle.h"
#include "rle_reference.h"

namespace rle = pneumoseg::rle;
using i128 = __int128;

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

struct RefRun {
  int64_t image;
  i128 start, end;
};

// The format's definition. Values above the core's documented cap (a token whose digits before
// the last exceed 2^58, "too large") are refused as the core refuses them.
bool ref_parse(const std::string& text, int64_t image, i128 area, rle::Style style, std::vector<RefRun>& runs) {
  std::vector<std::string> tokens;
  std::string cur;
  for (char c : text) {
    if (is_space(c)) {
      if (!cur.empty()) tokens.push_back(cur), cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) tokens.push_back(cur);
  if (tokens.empty() || (tokens.size() == 1 && tokens[0] == "-1")) return true;
  std::vector<i128> values;
  for (const auto& t : tokens) {
    i128 v = 0;
    for (char c : t) {
      if (c < '0' || c > '9') return false;
      if (v > (i128(1) << 58)) return false;
      v = v * 10 + (c - '0');
    }
    values.push_back(v);
  }
  if (values.size() % 2) return false;
  i128 cursor = 0;
  for (size_t i = 0; i < values.size(); i += 2) {
    const i128 a = values[i], len = values[i + 1];
    i128 start;
    if (style == rle::Style::Siim) {
      start = cursor + a;
    } else {
      if (a == 0) return false;
      start = a - 1;
    }
    if (start + len > area) return false;
    if (len > 0) runs.push_back(RefRun{image, start, start + len});
    cursor = start + len;
  }
  return true;
}

// Union of runs per image, sorted: the normal form parse_runs promises.
std::vector<RefRun> ref_normalise(std::vector<RefRun> runs) {
  std::sort(runs.begin(), runs.end(), [](const RefRun& a, const RefRun& b) {
    return a.image != b.image ? a.image < b.image : a.start < b.start;
  });
  std::vector<RefRun> out;
  for (const auto& r : runs) {
    if (!out.empty() && out.back().image == r.image && r.start <= out.back().end) {
      out.back().end = std::max(out.back().end, r.end);
    } else {
      out.push_back(r);
    }
  }
  return out;
}

std::string joined(const rle::EncodedBatch& b, size_t i) {
  std::string s;
  for (int64_t k = b.first[i]; k < b.first[i + 1]; ++k) s += b.pieces[k];
  return s;
}

void huge_mode(FuzzedDataProvider& fdp, rle::Style style) {
  const int64_t H = fdp.ConsumeIntegral<int64_t>() >> fdp.ConsumeIntegralInRange<int>(0, 63);
  const int64_t W = fdp.ConsumeIntegral<int64_t>() >> fdp.ConsumeIntegralInRange<int>(0, 63);
  const std::string text = fdp.ConsumeRandomLengthString(400);
  std::vector<rle::RleText> texts{rle::RleText{text.data(), text.size(), 0, -1}};
  std::vector<rle::Run> runs;
  const bool refused = fuzz::rejects("parse_runs (huge)", [&] { rle::parse_runs(texts, H, W, style, runs); });
  const i128 area = i128(H) * W;
  std::vector<RefRun> ref;
  const bool ref_ok = H >= 0 && W >= 0 && area <= (i128(1) << 62) && ref_parse(text, 0, area, style, ref);
  FUZZ_CHECK(refused == !ref_ok, "parse_runs " + std::string(refused ? "refused" : "accepted") + " '" + text +
                                     "' for " + std::to_string(H) + "x" + std::to_string(W));
  if (refused) return;
  ref = ref_normalise(ref);
  FUZZ_CHECK(runs.size() == ref.size(), "run count");
  for (size_t i = 0; i < runs.size(); ++i) {
    FUZZ_CHECK(runs[i].start == ref[i].start && runs[i].end == ref[i].end && runs[i].image == 0, "run " + std::to_string(i));
  }
}

void small_mode(FuzzedDataProvider& fdp, rle::Style style) {
  const int64_t N = fdp.ConsumeIntegralInRange<int64_t>(1, 3);
  const int64_t H = fdp.ConsumeIntegralInRange<int64_t>(0, 12);
  const int64_t W = fdp.ConsumeIntegralInRange<int64_t>(0, 12);
  const int layout_code = fdp.ConsumeIntegralInRange<int>(0, 4);
  const int64_t pad = fdp.ConsumeIntegralInRange<int64_t>(0, 3);
  const int count = fdp.ConsumeIntegralInRange<int>(1, 4);
  std::vector<std::string> strings;
  std::vector<int64_t> images;
  for (int i = 0; i < count; ++i) {
    images.push_back(fdp.ConsumeIntegralInRange<int64_t>(0, N - 1));
    strings.push_back(fdp.ConsumeRandomLengthString(120));
  }
  std::vector<rle::RleText> texts;
  for (int i = 0; i < count; ++i) texts.push_back(rle::RleText{strings[i].data(), strings[i].size(), images[i], i});

  std::vector<rle::Run> runs;
  const bool refused = fuzz::rejects("parse_runs", [&] { rle::parse_runs(texts, H, W, style, runs); });
  std::vector<RefRun> ref;
  bool ref_ok = true;
  for (int i = 0; i < count && ref_ok; ++i) ref_ok = ref_parse(strings[i], images[i], i128(H) * W, style, ref);
  FUZZ_CHECK(refused == !ref_ok, std::string("parse_runs ") + (refused ? "refused" : "accepted") + " input");
  if (refused) return;

  // Paint into an exactly sized buffer: pixels zeroed (the contract), padding bytes a canary.
  const fuzz::Layout l = fuzz::make_layout(N, H, W, layout_code, pad);
  fuzz::Block out(static_cast<size_t>(l.extent));
  std::memset(out.data, 0xA5, out.size);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < H; ++r)
      for (int64_t c = 0; c < W; ++c) out.data[fuzz::offset(l, n, r, c)] = 0;
  const auto view = fuzz::view3(out.data + l.origin, pneumoseg::DType::UInt8, N, H, W, l);
  const bool paint_refused = fuzz::rejects("paint_runs_cpu", [&] { rle::paint_runs_cpu(runs, view); });
  FUZZ_CHECK(!paint_refused, "paint_runs_cpu refused runs that parse_runs produced");

  // Expected column-major images from the reference runs.
  std::vector<std::vector<uint8_t>> expect(N, std::vector<uint8_t>(H * W, 0));
  for (const auto& r : ref)
    for (i128 k = r.start; k < r.end; ++k) expect[r.image][static_cast<int64_t>(k)] = 1;
  std::vector<bool> is_pixel(out.size, false);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t r = 0; r < H; ++r) {
      for (int64_t c = 0; c < W; ++c) {
        const int64_t o = fuzz::offset(l, n, r, c);
        is_pixel[o] = true;
        FUZZ_CHECK(out.data[o] == expect[n][c * H + r],
                   "pixel (" + std::to_string(n) + "," + std::to_string(r) + "," + std::to_string(c) + ") = " +
                       std::to_string(out.data[o]));
      }
    }
  }
  for (size_t o = 0; o < out.size; ++o) FUZZ_CHECK(is_pixel[o] || out.data[o] == 0xA5, "padding byte written");

  // Round trip: the decoded masks (C order) re-encode to the canonical strings, by both CPU encoders.
  fuzz::Block masks(static_cast<size_t>(std::max<int64_t>(1, N * H * W)));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < H; ++r)
      for (int64_t c = 0; c < W; ++c) masks.data[(n * H + r) * W + c] = expect[n][c * H + r];
  const fuzz::Layout cl = fuzz::make_layout(N, H, W, 0, 0);
  const auto mview = fuzz::view3(masks.data, pneumoseg::DType::UInt8, N, H, W, cl);
  rle::EncodedBatch enc, units;
  FUZZ_CHECK(!fuzz::rejects("encode_cpu", [&] { rle::encode_cpu(mview, style, enc); }), "encode_cpu refused");
  FUZZ_CHECK(!fuzz::rejects("encode_units_cpu", [&] { rle::encode_units_cpu(mview, style, units); }),
             "encode_units_cpu refused");
  FUZZ_CHECK(enc.first.size() == static_cast<size_t>(N + 1) && units.first.size() == static_cast<size_t>(N + 1),
             "batch layout");
  for (int64_t n = 0; n < N; ++n) {
    const std::string canonical = fuzz::ref_encode(expect[n], style);
    const std::string got = joined(enc, n), got_units = joined(units, n);
    FUZZ_CHECK(got == canonical, "encode_cpu gave '" + got + "', canonical '" + canonical + "'");
    FUZZ_CHECK(got_units == canonical, "encode_units_cpu gave '" + got_units + "', canonical '" + canonical + "'");
    std::vector<rle::Run> again;
    std::vector<rle::RleText> t{rle::RleText{got.data(), got.size(), 0, -1}};
    FUZZ_CHECK(!fuzz::rejects("parse_runs (round trip)", [&] { rle::parse_runs(t, H, W, style, again); }),
               "the canonical string '" + got + "' does not parse");
    std::vector<uint8_t> back(H * W, 0);
    for (const auto& r : again)
      for (int64_t k = r.start; k < r.end; ++k) back[k] = 1;
    FUZZ_CHECK(back == expect[n], "decode(encode(mask)) != mask for '" + got + "'");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider fdp(data, size);
  const uint8_t mode = fdp.ConsumeIntegral<uint8_t>();
  const rle::Style style = (mode & 1) ? rle::Style::Absolute : rle::Style::Siim;
  if ((mode & 6) == 6) {
    huge_mode(fdp, style);
  } else {
    small_mode(fdp, style);
  }
  return 0;
}
