// RLE encoding of fuzzer-chosen masks (csrc/rle: encode_cpu and its CUDA-algorithm twin
// encode_units_cpu): every dtype, strided layouts (transposed, padded, reversed, broadcast), sizes 0
// and 1 and heights across the 32-row unit of the data-parallel encoder, against a reference encoder
// that reads "nonzero" from the bits. The strings must also decode back to the mask.
#include <fuzzer/FuzzedDataProvider.h>

#include <string>
#include <vector>

#include "fuzz_util.h"
#include "rle/rle.h"
#include "rle_reference.h"

namespace rle = pneumoseg::rle;
using pneumoseg::DType;

namespace {

std::string joined(const rle::EncodedBatch& b, size_t i) {
  std::string s;
  for (int64_t k = b.first[i]; k < b.first[i + 1]; ++k) s += b.pieces[k];
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider fdp(data, size);
  const rle::Style style = fdp.ConsumeBool() ? rle::Style::Absolute : rle::Style::Siim;
  const auto dtype = static_cast<DType>(fdp.ConsumeIntegralInRange<int>(0, static_cast<int>(DType::Float64)));
  const int64_t N = fdp.ConsumeIntegralInRange<int64_t>(0, 3);
  const int64_t H = fdp.ConsumeIntegralInRange<int64_t>(0, 70);
  const int64_t W = fdp.ConsumeIntegralInRange<int64_t>(0, 10);
  const int layout_code = fdp.ConsumeIntegralInRange<int>(0, 5);
  const int64_t pad = fdp.ConsumeIntegralInRange<int64_t>(0, 3);
  // Element bytes: the fuzzer's, repeated to fill the buffer (long runs stay reachable from small
  // inputs); an all-zero mask when it gives none.
  const fuzz::Layout l = fuzz::make_layout(N, H, W, layout_code, pad);
  const int64_t esize = pneumoseg::dtype_size(dtype);
  fuzz::Block buf(static_cast<size_t>(l.extent * esize));
  const std::vector<uint8_t> bytes = fdp.ConsumeRemainingBytes<uint8_t>();
  for (size_t i = 0; i < buf.size; ++i) buf.data[i] = bytes.empty() ? 0 : bytes[i % bytes.size()];

  const auto view = fuzz::view3(buf.data + l.origin * esize, dtype, N, H, W, l);
  rle::EncodedBatch enc, units;
  FUZZ_CHECK(!fuzz::rejects("encode_cpu", [&] { rle::encode_cpu(view, style, enc); }), "encode_cpu refused a valid mask");
  FUZZ_CHECK(!fuzz::rejects("encode_units_cpu", [&] { rle::encode_units_cpu(view, style, units); }),
             "encode_units_cpu refused a valid mask");
  FUZZ_CHECK(enc.first.size() == static_cast<size_t>(N + 1) && units.first.size() == static_cast<size_t>(N + 1),
             "one string per mask");
  for (int64_t n = 0; n < N; ++n) {
    std::vector<uint8_t> fg(H * W);
    for (int64_t r = 0; r < H; ++r)
      for (int64_t c = 0; c < W; ++c) fg[c * H + r] = fuzz::element_nonzero(buf.data, dtype, fuzz::offset(l, n, r, c));
    const std::string expect = fuzz::ref_encode(fg, style);
    const std::string got = joined(enc, n), got_units = joined(units, n);
    FUZZ_CHECK(got == expect, "encode_cpu gave '" + got + "', expected '" + expect + "' (dtype " +
                                  pneumoseg::dtype_name(dtype) + ")");
    FUZZ_CHECK(got_units == expect, "encode_units_cpu gave '" + got_units + "', expected '" + expect + "'");
    // Decoding the string paints the same mask.
    std::vector<rle::Run> runs;
    std::vector<rle::RleText> t{rle::RleText{got.data(), got.size(), 0, -1}};
    FUZZ_CHECK(!fuzz::rejects("parse_runs", [&] { rle::parse_runs(t, H, W, style, runs); }), "'" + got + "' does not parse");
    fuzz::Block out(static_cast<size_t>(H * W));
    std::memset(out.data, 0, out.size);
    const auto oview = fuzz::view3(out.data, DType::UInt8, 1, H, W, fuzz::make_layout(1, H, W, 0, 0));
    FUZZ_CHECK(!fuzz::rejects("paint_runs_cpu", [&] { rle::paint_runs_cpu(runs, oview); }), "paint refused");
    for (int64_t r = 0; r < H; ++r)
      for (int64_t c = 0; c < W; ++c) FUZZ_CHECK(out.data[r * W + c] == fg[c * H + r], "decode(encode(mask)) != mask");
  }
  return 0;
}
