// The fused combo loss on the CPU (csrc/loss: forward_cpu, backward_cpu; the AVX2 loops where the CPU
// has them, the baseline ones with PNEUMOSEG_DISABLE_AVX2=1; 8 or more images take the threaded path)
// on small fuzzer-chosen batches: every logits / target dtype pair (and refused ones), raw bit
// patterns (NaN, inf, denormals) or moderate values, and weights from NaN and negatives to 1e300.
// Checks, besides the sanitizers:
//  - bad arguments (negative or NaN weights, empty shapes, wrong dtypes) are refused with InputError;
//  - a target outside [0, 1] or NaN makes the loss NaN and is counted in the state;
//  - where the contract promises a number (finite logits, valid targets, finite weights) the loss
//    is finite, and so is the float32 / float64 gradient;
//  - on moderate inputs, loss and gradient agree with a long-double reference written from the
//    definitions in pneumoseg/losses.py.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "loss/combo_loss.h"

namespace loss = pneumoseg::loss;
using pneumoseg::DType;
using LD = long double;

namespace {

pneumoseg::TensorView rows(void* data, DType t, int64_t n, int64_t p) {
  pneumoseg::TensorView v;
  v.data = data, v.dtype = t, v.ndim = 2;
  v.shape[0] = n, v.shape[1] = p, v.strides[0] = p, v.strides[1] = 1;
  return v;
}

pneumoseg::TensorView scalar(void* data, DType t) {
  pneumoseg::TensorView v;
  v.data = data, v.dtype = t, v.ndim = 0;
  return v;
}

void store(uint8_t* base, DType t, int64_t i, double v) {
  const int64_t size = pneumoseg::dtype_size(t);
  uint8_t* p = base + i * size;
  if (t == DType::Float64) {
    std::memcpy(p, &v, 8);
  } else if (t == DType::Float32) {
    const float f = static_cast<float>(v);
    std::memcpy(p, &f, 4);
  } else if (t == DType::BFloat16) {  // values given here are exact in bfloat16 (k / 8, k / 256)
    const float f = static_cast<float>(v);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    const uint16_t b = static_cast<uint16_t>(bits >> 16);
    std::memcpy(p, &b, 2);
  } else if (t == DType::Float16) {  // |v| <= 16 in steps of 1/256: exact in float16
    const double a = std::fabs(v);
    uint16_t h = 0;
    if (a != 0) {
      int e;
      const double m = std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
      const int exp = e - 1 + 15;
      if (exp <= 0) {
        h = static_cast<uint16_t>(std::lround(std::ldexp(a, 24)));
      } else {
        h = static_cast<uint16_t>((exp << 10) | (std::lround(std::ldexp(m, 11)) - 1024));
      }
    }
    if (v < 0) h |= 0x8000;
    std::memcpy(p, &h, 2);
  } else {  // uint8 / bool
    *p = static_cast<uint8_t>(v);
  }
}

struct PixelRef {
  LD bce, focal, p, q, mismatch, dbce, dfocal;
  LD bce_mag;  // sum of |terms| of bce as the core forms it: its float rounding error scales with this
};

PixelRef pixel_ref(LD x, LD t, LD w, LD gamma) {
  PixelRef r;
  const LD e = std::exp(-std::fabs(x));
  r.p = x >= 0 ? 1 / (1 + e) : e / (1 + e);
  r.q = x >= 0 ? e / (1 + e) : 1 / (1 + e);
  const LD lp = std::log1p(e);
  r.bce = std::max<LD>(x, 0) - x * t + lp + (w - 1) * t * (lp + std::max<LD>(-x, 0));
  r.bce_mag = std::fabs(x) * (1 + t) + lp + std::fabs((w - 1) * t) * (lp + std::fabs(x));
  r.mismatch = r.p * (1 - t) + r.q * t;
  const LD m = r.q * t + r.p * (1 - t);
  const LD mg = gamma == 0 ? 1 : (m > 0 ? std::pow(m, gamma) : 0);
  const LD slope = gamma == 0 ? 0 : (m > 0 ? gamma * std::pow(m, gamma - 1) : 0);
  r.focal = mg * r.bce;
  r.dbce = (1 - t) * r.p - w * t * r.q;
  r.dfocal = slope * (1 - 2 * t) * r.p * r.q * r.bce + mg * r.dbce;
  return r;
}

std::string fmt(double v) {
  char b[40];
  std::snprintf(b, sizeof b, "%.9g", v);
  return b;
}

bool finite_all(const std::vector<double>& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return std::isfinite(x); });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider fdp(data, size);
  static const DType kLogits[] = {DType::Float16, DType::BFloat16, DType::Float32, DType::Float64, DType::Int32};
  static const DType kTargets[] = {DType::Bool,    DType::UInt8,   DType::Float16, DType::BFloat16,
                                   DType::Float32, DType::Float64, DType::Int8};
  const uint8_t lpick = fdp.ConsumeIntegral<uint8_t>(), tpick = fdp.ConsumeIntegral<uint8_t>();
  const DType ldt = kLogits[lpick < 250 ? lpick % 4 : 4];  // a refused dtype now and then
  const DType tdt = kTargets[tpick < 250 ? tpick % 6 : 6];
  const int64_t N = fdp.ConsumeIntegralInRange<int64_t>(fdp.ConsumeIntegral<uint8_t>() == 0 ? 0 : 1, 9);
  const int64_t P = fdp.ConsumeIntegralInRange<int64_t>(fdp.ConsumeIntegral<uint8_t>() == 0 ? 0 : 1, 300);
  const bool moderate_logits = fdp.ConsumeBool(), clean_targets = fdp.ConsumeBool();
  loss::ComboParams params;
  auto pick = [&](double usual) {
    const uint8_t k = fdp.ConsumeIntegral<uint8_t>();
    if (k < 128) return usual * (k % 4);  // 0, 1, 2 or 3 times the default: the common case
    return fuzz::special_double(k % 32, fdp.ConsumeIntegral<uint64_t>());
  };
  params.bce_weight = pick(1.0);
  params.dice_weight = pick(1.0);
  params.focal_weight = pick(0.5);
  params.focal_gamma = pick(1.0);
  params.smooth = pick(1.0);
  params.pos_weight = pick(1.0);
  params.per_image = fdp.ConsumeBool();
  const bool loss_double = fdp.ConsumeBool(), grad_double = fdp.ConsumeBool();
  const double grad_in = fdp.ConsumeBool() ? 1.0 : fuzz::special_double(fdp.ConsumeIntegral<uint8_t>() % 32,
                                                                         fdp.ConsumeIntegral<uint64_t>());

  // Inputs: moderate values (logits k / 8 in [-16, 16], targets {0, 1} or k / 256) or raw bytes.
  const int64_t lsize = pneumoseg::dtype_size(ldt), tsize = pneumoseg::dtype_size(tdt);
  fuzz::Block x(static_cast<size_t>(N * P * lsize)), t(static_cast<size_t>(N * P * tsize));
  const std::vector<uint8_t> bytes = fdp.ConsumeRemainingBytes<uint8_t>();
  auto byte = [&](size_t i) -> uint8_t { return bytes.empty() ? 0 : bytes[i % bytes.size()]; };
  const bool float_logits = ldt != DType::Int32, float_target = tdt != DType::Bool && tdt != DType::UInt8 && tdt != DType::Int8;
  for (int64_t i = 0; i < N * P; ++i) {
    if (moderate_logits && float_logits) {
      store(x.data, ldt, i, static_cast<int8_t>(byte(i)) / 8.0);
    } else {
      for (int64_t b = 0; b < lsize; ++b) x.data[i * lsize + b] = byte(i * lsize + b + 7);
    }
    if (tdt == DType::Bool) {
      t.data[i] = byte(i + 3) & 1;  // a bool array holds 0 and 1 only
    } else if (clean_targets && float_target) {
      const uint8_t k = byte(i + 3);
      store(t.data, tdt, i, (k & 1) ? (k >> 1) / 128.0 : (k >> 1) & 1);
    } else if (clean_targets) {
      t.data[i] = byte(i + 3) & 1;
    } else {
      for (int64_t b = 0; b < tsize; ++b) t.data[i * tsize + b] = byte(i * tsize + b + 3);
    }
  }

  fuzz::Block state(static_cast<size_t>(N * loss::kStateCols * 8)), loss_out(loss_double ? 8 : 4);
  const auto lv = rows(x.data, ldt, N, P), tv = rows(t.data, tdt, N, P);
  const auto sv = rows(state.data, DType::Float64, N, loss::kStateCols);
  const auto out_v = scalar(loss_out.data, loss_double ? DType::Float64 : DType::Float32);
  const bool bad_params = !(params.bce_weight >= 0 && params.dice_weight >= 0 && params.focal_weight >= 0 &&
                            params.focal_gamma >= 0 && params.smooth >= 0 && params.pos_weight >= 0);
  const bool must_refuse = bad_params || N == 0 || P == 0 || !float_logits || tdt == DType::Int8;
  const bool refused = fuzz::rejects("forward_cpu", [&] { loss::forward_cpu(lv, tv, params, sv, out_v); });
  FUZZ_CHECK(refused == must_refuse, std::string("forward_cpu refused=") + (refused ? "1" : "0"));
  if (refused) return 0;
  double value;
  if (loss_double) {
    std::memcpy(&value, loss_out.data, 8);
  } else {
    float f;
    std::memcpy(&f, loss_out.data, 4);
    value = f;
  }
  std::vector<double> st(N * loss::kStateCols);
  std::memcpy(st.data(), state.data, state.size);

  // The reference, in long double, from the element values.
  std::vector<LD> xs(N * P), ts(N * P);
  bool logits_finite = true, targets_valid = true, moderate = true;
  LD max_abs_x = 0;
  for (int64_t i = 0; i < N * P; ++i) {
    xs[i] = fuzz::element_value(x.data, ldt, i);
    ts[i] = fuzz::element_value(t.data, tdt, i);
    // Below float64 the math is float: targets are read as float first (so 1 + 2^-52 is a valid 1).
    if (ldt != DType::Float64) ts[i] = static_cast<float>(ts[i]);
    logits_finite &= std::isfinite(static_cast<double>(xs[i]));
    targets_valid &= ts[i] >= 0 && ts[i] <= 1;
    if (std::isfinite(static_cast<double>(xs[i]))) max_abs_x = std::max(max_abs_x, std::fabs(xs[i]));
  }
  if (std::getenv("FUZZ_DEBUG")) {  // what a finding was made of, for minimised reproducers
    std::fprintf(stderr, "logits %s target %s N=%ld P=%ld bce=%g dice=%g focal=%g gamma=%g smooth=%g pos=%g per_image=%d loss=%g\n",
                 pneumoseg::dtype_name(ldt), pneumoseg::dtype_name(tdt), long(N), long(P), params.bce_weight,
                 params.dice_weight, params.focal_weight, params.focal_gamma, params.smooth, params.pos_weight,
                 int(params.per_image), value);
    for (int64_t i = 0; i < std::min<int64_t>(N * P, 16); ++i)
      std::fprintf(stderr, "  x[%ld]=%.9Lg t=%.9Lg\n", long(i), xs[i], ts[i]);
    for (int c = 0; c < loss::kStateCols; ++c) std::fprintf(stderr, "  state[0][%d]=%.17g\n", c, st[c]);
  }
  int64_t bad_count = 0;
  for (int64_t n = 0; n < N; ++n) bad_count += static_cast<int64_t>(st[n * loss::kStateCols + loss::kBadTargets]);
  int64_t expect_bad = 0;
  for (int64_t i = 0; i < N * P; ++i) expect_bad += !(ts[i] >= 0 && ts[i] <= 1);
  FUZZ_CHECK(bad_count == expect_bad, "bad-target count " + std::to_string(bad_count) + ", expected " + std::to_string(expect_bad));
  if (!targets_valid) {
    FUZZ_CHECK(std::isnan(value), "invalid targets gave a plausible loss " + std::to_string(value));
  }
  const double wmax = std::max({params.bce_weight, params.dice_weight, params.focal_weight, params.pos_weight});
  LD sum_t = 0;
  for (LD v : ts) sum_t += v;
  // Bounds that keep a sum of weighted terms within float's range (the float32 loss can overflow
  // legitimately past them).
  const bool weights_ok = wmax <= 1e3 && params.focal_gamma <= 1e3 && params.smooth <= 1e6 && max_abs_x <= 1e30;
  // Dice's denominator sum p + sum t + smooth is 0 only when smooth = 0, every target is 0 and
  // every p underflows (float64 logits below -745): 0 / 0 there, as in any Dice.
  const bool promised = logits_finite && targets_valid && weights_ok && (params.smooth > 0 || sum_t > 0);
  if (promised) FUZZ_CHECK(std::isfinite(value), "non-finite loss " + std::to_string(value) + " on valid input");

  // Backward.
  const DType gdt = grad_double ? DType::Float64 : DType::Float32;
  fuzz::Block grad_scalar(grad_double ? 8 : 4), grad(static_cast<size_t>(N * P * lsize));
  if (grad_double) {
    std::memcpy(grad_scalar.data, &grad_in, 8);
  } else {
    const float f = static_cast<float>(grad_in);
    std::memcpy(grad_scalar.data, &f, 4);
  }
  const auto gv = rows(grad.data, ldt, N, P);
  const bool grad_refused = fuzz::rejects("backward_cpu", [&] {
    loss::backward_cpu(scalar(grad_scalar.data, gdt), lv, tv, sv, params, gv);
  });
  FUZZ_CHECK(!grad_refused, "backward_cpu refused what forward_cpu took");
  std::vector<double> g(N * P);
  for (int64_t i = 0; i < N * P; ++i) g[i] = fuzz::element_value(grad.data, ldt, i);
  const double gin = grad_double ? grad_in : static_cast<double>(static_cast<float>(grad_in));
  const bool gamma_ok = params.focal_weight == 0 || params.focal_gamma == 0 || params.focal_gamma >= 1;
  if (promised && gamma_ok && std::isfinite(gin) && std::fabs(gin) <= 1e3 && params.smooth >= 1e-6 &&
      (ldt == DType::Float32 || ldt == DType::Float64)) {
    FUZZ_CHECK(finite_all(g), "non-finite gradient on valid input");
  }

  // Moderate inputs: agreement with the reference.
  if (!(promised && max_abs_x <= 60 && params.smooth >= 1e-3 && wmax <= 1e3 && params.focal_gamma <= 10 &&
        std::isfinite(gin) && std::fabs(gin) <= 1e6)) {
    return 0;
  }
  const LD w = params.pos_weight, gamma = params.focal_gamma;
  std::vector<PixelRef> px(N * P);
  std::vector<LD> sp(N, 0), stt(N, 0), spt(N, 0), smis(N, 0);
  LD sbce = 0, sfocal = 0, sbce_mag = 0;
  for (int64_t i = 0; i < N * P; ++i) {
    px[i] = pixel_ref(xs[i], ts[i], w, gamma);
    const int64_t n = i / P;
    sp[n] += px[i].p, stt[n] += ts[i], spt[n] += px[i].p * ts[i], smis[n] += px[i].mismatch;
    sbce += px[i].bce, sfocal += px[i].focal, sbce_mag += px[i].bce_mag;
  }
  const LD total = static_cast<LD>(N) * P, s = params.smooth;
  LD dice = 0;
  std::vector<LD> coef_t(N), coef_c(N);
  if (params.per_image) {
    for (int64_t n = 0; n < N; ++n) {
      const LD den = sp[n] + stt[n] + s;
      dice += smis[n] / den / N;
      coef_t[n] = params.dice_weight / N * (-2 / den);
      coef_c[n] = params.dice_weight / N * (2 * spt[n] + s) / (den * den);
    }
  } else {
    LD P_ = 0, T_ = 0, I_ = 0, M_ = 0;
    for (int64_t n = 0; n < N; ++n) P_ += sp[n], T_ += stt[n], I_ += spt[n], M_ += smis[n];
    const LD den = P_ + T_ + s;
    dice = M_ / den;
    for (int64_t n = 0; n < N; ++n) coef_t[n] = params.dice_weight * (-2 / den), coef_c[n] = params.dice_weight * (2 * I_ + s) / (den * den);
  }
  const LD ref = params.bce_weight * sbce / total + params.focal_weight * sfocal / total + params.dice_weight * dice;
  // With pos_weight != 1 the per-pixel BCE cancels (x t against (w - 1) t x for x < 0; torch's
  // formula does too): the tolerance scales with the terms, not with their small sum.
  const LD scale = (params.bce_weight + params.focal_weight) * sbce_mag / total +
                   params.dice_weight * std::fabs(dice);
  const bool double_math = ldt == DType::Float64;
  const double loss_tol = (double_math && loss_double ? 1e-9 : 2e-4) * static_cast<double>(scale) + 1e-30;
  FUZZ_CHECK(std::fabs(value - static_cast<double>(ref)) <= loss_tol,
             "loss " + fmt(value) + " vs reference " + fmt(static_cast<double>(ref)) + " tol " + fmt(loss_tol));

  const double store_rel = ldt == DType::Float16 ? 2e-3 : ldt == DType::BFloat16 ? 1e-2 : 0;
  // Absolute slack below float's normal range (a tiny incoming gradient makes float subnormals).
  const double store_abs = ldt == DType::Float16 ? 1.2e-7 : double_math ? 1e-300 : 1e-37;
  for (int64_t i = 0; i < N * P; ++i) {
    const int64_t n = i / P;
    const PixelRef& r = px[i];
    const LD cb = params.bce_weight / total, cf = params.focal_weight / total;
    const LD pq = r.p * r.q;
    LD expect = cb * r.dbce + (coef_t[n] * ts[i] + coef_c[n]) * pq;
    LD mag = cb * ((1 - ts[i]) * r.p + w * ts[i] * r.q) + (std::fabs(coef_t[n] * ts[i]) + std::fabs(coef_c[n])) * pq;
    if (params.focal_weight != 0) {
      expect += cf * r.dfocal;
      mag += cf * (std::fabs(r.dfocal) + r.bce_mag * (1 + gamma) + (1 - ts[i]) * r.p + w * ts[i] * r.q);
    }
    expect *= gin;
    mag *= std::fabs(gin);
    const double tol = (double_math ? 1e-9 : 2e-4) * static_cast<double>(mag) + store_rel * std::fabs(static_cast<double>(expect)) +
                       store_abs;
    if (ldt == DType::Float16 && std::fabs(static_cast<double>(expect)) > 65504 * (1 - store_rel) && std::isinf(g[i]) &&
        (g[i] > 0) == (expect > 0)) {
      continue;  // past float16's range: rounds to inf
    }
    FUZZ_CHECK(std::fabs(g[i] - static_cast<double>(expect)) <= tol,
               "gradient[" + std::to_string(i) + "] " + fmt(g[i]) + " vs reference " +
                   fmt(static_cast<double>(expect)) + " tol " + fmt(tol));
  }
  return 0;
}
