// The one Python binding of the native core. Arrays arrive as TensorView (built in
// pneumoseg/_native.py); every call releases the GIL around native work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/cuda_memory.h"
#include "common/errors.h"
#include "common/half.h"
#include "common/tensor_view.h"
#include "loss/combo_loss.h"
#include "postprocess/components.h"
#include "rle/rle.h"

#ifdef PNEUMOSEG_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;
using namespace pneumoseg;

namespace {

TensorView make_view(uintptr_t data, int dtype, int device, int device_index, const std::vector<int64_t>& shape,
                     const std::vector<int64_t>& strides) {
  if (shape.size() != strides.size()) fail_value("TensorView: shape and strides differ in length");
  if (shape.size() > static_cast<size_t>(kMaxDims)) {
    fail_value("TensorView: at most " + std::to_string(kMaxDims) + " dimensions");
  }
  if (dtype < 0 || dtype > static_cast<int>(DType::Float64)) fail_value("TensorView: unknown dtype code");
  if (device != 0 && device != 1) fail_value("TensorView: unknown device code");
  // Kernels read through typed pointers: a misaligned one is undefined behaviour (UBSan reports it,
  // vectorised loops may assume alignment). pneumoseg/_native.py copies such arrays first.
  if (data % static_cast<uintptr_t>(dtype_size(static_cast<DType>(dtype))) != 0) {
    fail_value(std::string("TensorView: the data address is not aligned to its dtype (") +
               dtype_name(static_cast<DType>(dtype)) + "); pass a copy of the array");
  }
  TensorView v;
  v.data = reinterpret_cast<void*>(data);
  v.dtype = static_cast<DType>(dtype);
  v.device = static_cast<Device>(device);
  v.device_index = device_index;
  v.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < v.ndim; ++i) {
    if (shape[i] < 0) fail_value("TensorView: negative shape");
    v.shape[i] = shape[i];
    v.strides[i] = strides[i];
  }
  return v;
}

#ifdef PNEUMOSEG_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for the caller, just no CUDA
    return 0;
  }
  return n;
}
// The native scratch pools (common/cuda_memory.h): bytes held, and giving the cached part back.
uint64_t cuda_scratch_reserved_bytes() { return cuda::reserved_bytes(); }
uint64_t cuda_release_scratch() {
  py::gil_scoped_release release;
  return cuda::release_cached();
}
#else
constexpr bool kBuiltWithCuda = false;
int cuda_device_count() { return 0; }
uint64_t cuda_scratch_reserved_bytes() { return 0; }
uint64_t cuda_release_scratch() { return 0; }
#endif

#ifndef PNEUMOSEG_WITH_CUDA
[[noreturn]] void no_cuda() {
  fail_value("this array is on a CUDA device, but pneumoseg was built without CUDA support "
             "(rebuild with nvcc on PATH, or -Ccmake.define.PNEUMOSEG_CUDA=ON)");
}
#endif

// Runs the CUDA branch for CUDA arrays (a clear error in a CPU-only build), the CPU branch otherwise.
#ifdef PNEUMOSEG_WITH_CUDA
#define PNEUMOSEG_ON_DEVICE(view, cpu_call, cuda_call) \
  do {                                                 \
    if ((view).device == Device::CUDA) {               \
      cuda_call;                                       \
    } else {                                           \
      cpu_call;                                        \
    }                                                  \
  } while (0)
#else
#define PNEUMOSEG_ON_DEVICE(view, cpu_call, cuda_call) \
  do {                                                 \
    if ((view).device == Device::CUDA) no_cuda();      \
    cpu_call;                                          \
  } while (0)
#endif

inline void* stream_of([[maybe_unused]] uintptr_t stream) { return reinterpret_cast<void*>(stream); }

// Each mask's pieces become one Python str; every piece is freed as soon as it is copied, so the
// peak is about the text once in C++ and once in Python.
py::list to_str_list(rle::EncodedBatch& batch) {
  const size_t n = batch.first.empty() ? 0 : batch.first.size() - 1;
  py::list out(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t a = batch.first[i], b = batch.first[i + 1];
    if (a < 0 || b < a || b > static_cast<int64_t>(batch.pieces.size())) throw NativeError("rle: bad piece offsets");
    if (b - a == 1) {
      std::string& only = batch.pieces[a];
      out[i] = py::str(only.data(), only.size());
      std::string().swap(only);
      continue;
    }
    size_t total = 0;
    for (int64_t k = a; k < b; ++k) total += batch.pieces[k].size();
    PyObject* text = PyUnicode_New(static_cast<Py_ssize_t>(total), 127);  // the encoder writes ASCII only
    if (text == nullptr) throw py::error_already_set();
    auto* dst = reinterpret_cast<char*>(PyUnicode_1BYTE_DATA(text));
    for (int64_t k = a; k < b; ++k) {
      std::string& piece = batch.pieces[k];
      std::memcpy(dst, piece.data(), piece.size());
      dst += piece.size();
      std::string().swap(piece);
    }
    out[i] = py::reinterpret_steal<py::str>(text);
  }
  return out;
}

rle::Style to_style(int style) {
  if (style != 0 && style != 1) fail_rle("style must be 'siim' or 'absolute'");
  return static_cast<rle::Style>(style);
}

py::list rle_encode(const TensorView& masks, int style, [[maybe_unused]] uintptr_t stream) {
  rle::EncodedBatch batch;
  {
    py::gil_scoped_release release;
    PNEUMOSEG_ON_DEVICE(masks, rle::encode_cpu(masks, to_style(style), batch),
                        rle::encode_cuda(masks, to_style(style), stream_of(stream), batch));
  }
  return to_str_list(batch);
}

py::list rle_encode_units_cpu(const TensorView& masks, int style) {
  rle::EncodedBatch batch;
  {
    py::gil_scoped_release release;
    rle::encode_units_cpu(masks, to_style(style), batch);
  }
  return to_str_list(batch);
}

// texts[i] (str or bytes) paints into image images[i]; items[i] is its index in the caller's list.
void rle_decode(const py::sequence& texts, const std::vector<int64_t>& images, const std::vector<int64_t>& items,
                const TensorView& out, int style, [[maybe_unused]] uintptr_t stream) {
  const size_t n = py::len(texts);
  if (images.size() != n || items.size() != n) fail_value("rle_decode: texts, images and items differ in length");
  check_ndim(out, 3, "out");
  std::vector<py::object> keep;  // the str objects own the buffers we point into
  keep.reserve(n);
  std::vector<rle::RleText> views;
  views.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    py::object t = texts[i];
    const char* data = nullptr;
    Py_ssize_t size = 0;
    if (PyUnicode_Check(t.ptr())) {
      data = PyUnicode_AsUTF8AndSize(t.ptr(), &size);
      if (!data) throw py::error_already_set();
    } else if (PyBytes_Check(t.ptr())) {
      char* d = nullptr;
      if (PyBytes_AsStringAndSize(t.ptr(), &d, &size) != 0) throw py::error_already_set();
      data = d;
    } else {
      fail_rle("rles[" + std::to_string(items[i]) + "] must be a str, got " +
               std::string(py::str(py::type::of(t).attr("__name__"))));
    }
    if (images[i] < 0 || images[i] >= out.shape[0]) fail_value("rle_decode: image index out of range");
    views.push_back(rle::RleText{data, static_cast<size_t>(size), images[i], items[i]});
    keep.push_back(std::move(t));
  }
  py::gil_scoped_release release;
  std::vector<rle::Run> runs;
  rle::parse_runs(views, out.shape[1], out.shape[2], to_style(style), runs);
  PNEUMOSEG_ON_DEVICE(out, rle::paint_runs_cpu(runs, out), rle::paint_runs_cuda(runs, out, stream_of(stream)));
}

loss::ComboParams combo_params(double bce_weight, double dice_weight, double focal_weight, double focal_gamma,
                               double smooth, double pos_weight, bool per_image) {
  loss::ComboParams p;
  p.bce_weight = bce_weight;
  p.dice_weight = dice_weight;
  p.focal_weight = focal_weight;
  p.focal_gamma = focal_gamma;
  p.smooth = smooth;
  p.pos_weight = pos_weight;
  p.per_image = per_image;
  return p;
}

// The loss runs in every training step, so its bindings take plain numbers: the address and dtype
// code of contiguous (N, P) logits / target (and gradient), the float64 (N, kStateCols) state and
// the 0-d loss or incoming gradient. Python builds no TensorView objects per step.
TensorView rows_view(uintptr_t data, int dtype, int64_t n, int64_t p, int device, int device_index) {
  return make_view(data, dtype, device, device_index, {n, p}, {p, 1});
}
TensorView state_view(uintptr_t data, int64_t n, int device, int device_index) {
  return make_view(data, static_cast<int>(DType::Float64), device, device_index, {n, loss::kStateCols},
                   {loss::kStateCols, 1});
}
TensorView scalar_view(uintptr_t data, bool is_double, int device, int device_index) {
  return make_view(data, static_cast<int>(is_double ? DType::Float64 : DType::Float32), device, device_index, {}, {});
}

void combo_loss_forward(uintptr_t logits_data, int logits_dtype, uintptr_t target_data, int target_dtype, int64_t n,
                        int64_t p, int device, int device_index, uintptr_t state_data, uintptr_t loss_data,
                        bool loss_is_double, const loss::ComboParams& params, [[maybe_unused]] uintptr_t stream) {
  const TensorView logits = rows_view(logits_data, logits_dtype, n, p, device, device_index);
  const TensorView target = rows_view(target_data, target_dtype, n, p, device, device_index);
  const TensorView state = state_view(state_data, n, device, device_index);
  const TensorView loss_out = scalar_view(loss_data, loss_is_double, device, device_index);
  py::gil_scoped_release release;
  PNEUMOSEG_ON_DEVICE(logits, loss::forward_cpu(logits, target, params, state, loss_out),
                      loss::forward_cuda(logits, target, params, state, loss_out, stream_of(stream)));
}

void combo_loss_backward(uintptr_t grad_loss_data, bool grad_is_double, uintptr_t logits_data, int logits_dtype,
                         uintptr_t target_data, int target_dtype, int64_t n, int64_t p, int device, int device_index,
                         uintptr_t state_data, uintptr_t grad_logits_data, const loss::ComboParams& params,
                         [[maybe_unused]] uintptr_t stream) {
  const TensorView grad_loss = scalar_view(grad_loss_data, grad_is_double, device, device_index);
  const TensorView logits = rows_view(logits_data, logits_dtype, n, p, device, device_index);
  const TensorView target = rows_view(target_data, target_dtype, n, p, device, device_index);
  const TensorView state = state_view(state_data, n, device, device_index);
  const TensorView grad_logits = rows_view(grad_logits_data, logits_dtype, n, p, device, device_index);
  py::gil_scoped_release release;
  PNEUMOSEG_ON_DEVICE(logits, loss::backward_cpu(grad_loss, logits, target, state, params, grad_logits),
                      loss::backward_cuda(grad_loss, logits, target, state, params, grad_logits, stream_of(stream)));
}

// CPU: a list of N int64 arrays of areas. CUDA: the list of per-image label counts; the areas are
// written into device memory that allocate_areas(K) (a Python callable) returns the address of.
py::object label_components(const TensorView& input, bool use_threshold, double threshold, int connectivity,
                            const TensorView& labels, [[maybe_unused]] uintptr_t stream,
                            [[maybe_unused]] const py::object& allocate_areas) {
  const postprocess::Foreground fg{use_threshold, threshold};
  if (input.device == Device::CUDA) {
#ifdef PNEUMOSEG_WITH_CUDA
    if (allocate_areas.is_none()) fail_value("label_components on CUDA needs allocate_areas");
    std::vector<int64_t> counts;
    auto allocate = [&allocate_areas](int64_t k) -> int64_t* {
      py::gil_scoped_acquire hold;
      return reinterpret_cast<int64_t*>(allocate_areas(k).cast<uintptr_t>());
    };
    {
      py::gil_scoped_release release;
      postprocess::label_cuda(input, fg, connectivity, labels, allocate, counts, stream_of(stream));
    }
    return py::cast(counts);
#else
    no_cuda();
#endif
  }
  std::vector<std::vector<int64_t>> areas;
  {
    py::gil_scoped_release release;
    postprocess::label_cpu(input, fg, connectivity, labels, areas);
  }
  py::list out;
  for (const auto& a : areas) {
    py::array_t<int64_t> arr(static_cast<py::ssize_t>(a.size()));
    std::copy(a.begin(), a.end(), arr.mutable_data());
    out.append(arr);
  }
  return out;
}

postprocess::PostprocessParams postprocess_params(bool mask_use_threshold, double mask_threshold, bool use_triplet,
                                                  double triplet_top, int64_t triplet_min_area,
                                                  int64_t min_component_area, int connectivity) {
  postprocess::PostprocessParams p;
  p.mask = postprocess::Foreground{mask_use_threshold, mask_threshold};
  p.use_triplet = use_triplet;
  p.triplet_top = triplet_top;
  p.triplet_min_area = triplet_min_area;
  p.min_component_area = min_component_area;
  p.connectivity = connectivity;
  return p;
}

// components: the address of a host int32 (N,) array that receives each output mask's number of
// components, or 0 for none.
std::vector<uint8_t> postprocess_masks(const TensorView& input, const postprocess::PostprocessParams& p,
                                       const std::vector<uint8_t>& keep_image, const TensorView& out,
                                       uintptr_t components) {
  py::gil_scoped_release release;
  return postprocess::postprocess_cpu(input, p, keep_image, out, reinterpret_cast<int32_t*>(components));
}

// keep_image_device: a device uint8 (N,) array's address, or 0 to keep every image; components: a
// device int32 (N,) array's address, or 0.
void postprocess_masks_cuda(const TensorView& input, [[maybe_unused]] const postprocess::PostprocessParams& p,
                            [[maybe_unused]] uintptr_t keep_image_device, [[maybe_unused]] const TensorView& out,
                            [[maybe_unused]] uintptr_t components, [[maybe_unused]] uintptr_t stream) {
  py::gil_scoped_release release;
  PNEUMOSEG_ON_DEVICE(input, fail_value("postprocess_masks_cuda takes CUDA arrays"),
                      postprocess::postprocess_cuda(input, p, reinterpret_cast<const uint8_t*>(keep_image_device),
                                                    out, reinterpret_cast<int32_t*>(components), stream_of(stream)));
}

// Test hook: the float -> float16 / bfloat16 rounding the kernels use (also on the GPU).
py::array_t<uint16_t> round_to_half_bits(const py::array_t<float, py::array::c_style | py::array::forcecast>& values,
                                         bool bfloat16) {
  py::array_t<uint16_t> out(values.size());
  const float* in = values.data();
  uint16_t* dst = out.mutable_data();
  for (py::ssize_t i = 0; i < values.size(); ++i) dst[i] = bfloat16 ? float_to_bf16(in[i]) : float_to_half(in[i]);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pneumoseg native core (CPU and, when built with it, CUDA kernels)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InputError& e) {
      py::module_ errors = py::module_::import("pneumoseg.errors");
      const char* cls = e.kind() == InputError::Kind::Rle ? "RLEError" : "InvalidInputError";
      PyErr_SetString(errors.attr(cls).ptr(), e.what());
    } catch (const NativeError& e) {
      py::module_ errors = py::module_::import("pneumoseg.errors");
      PyErr_SetString(errors.attr("NativeError").ptr(), e.what());
    }
  });

  py::class_<TensorView>(m, "TensorView")
      .def(py::init(&make_view), py::arg("data"), py::arg("dtype"), py::arg("device"), py::arg("device_index"),
           py::arg("shape"), py::arg("strides"))
      .def_property_readonly("ndim", [](const TensorView& v) { return v.ndim; })
      .def_property_readonly("shape", [](const TensorView& v) {
        return std::vector<int64_t>(v.shape, v.shape + v.ndim);
      });

  m.def("built_with_cuda", [] { return kBuiltWithCuda; });
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_scratch_reserved_bytes", &cuda_scratch_reserved_bytes);
  m.def("cuda_release_scratch", &cuda_release_scratch);
  m.def("rle_encode", &rle_encode, py::arg("masks"), py::arg("style"), py::arg("stream") = 0);
  m.def("rle_encode_units_cpu", &rle_encode_units_cpu, py::arg("masks"), py::arg("style"));
  py::class_<loss::ComboParams>(m, "ComboParams")
      .def(py::init(&combo_params), py::arg("bce_weight"), py::arg("dice_weight"), py::arg("focal_weight"),
           py::arg("focal_gamma"), py::arg("smooth"), py::arg("pos_weight"), py::arg("per_image"));
  m.attr("COMBO_STATE_COLS") = static_cast<int>(loss::kStateCols);
  m.def("combo_loss_forward", &combo_loss_forward, py::arg("logits"), py::arg("logits_dtype"), py::arg("target"),
        py::arg("target_dtype"), py::arg("n"), py::arg("p"), py::arg("device"), py::arg("device_index"),
        py::arg("state"), py::arg("loss"), py::arg("loss_is_double"), py::arg("params"), py::arg("stream"));
  m.def("combo_loss_backward", &combo_loss_backward, py::arg("grad_loss"), py::arg("grad_is_double"),
        py::arg("logits"), py::arg("logits_dtype"), py::arg("target"), py::arg("target_dtype"), py::arg("n"),
        py::arg("p"), py::arg("device"), py::arg("device_index"), py::arg("state"), py::arg("grad_logits"),
        py::arg("params"), py::arg("stream"));
  m.def("label_components", &label_components, py::arg("input"), py::arg("use_threshold"), py::arg("threshold"),
        py::arg("connectivity"), py::arg("labels"), py::arg("stream") = 0, py::arg("allocate_areas") = py::none());
  m.def("postprocess_masks_cuda", &postprocess_masks_cuda, py::arg("input"), py::arg("params"),
        py::arg("keep_image_device"), py::arg("out"), py::arg("components") = 0, py::arg("stream") = 0);
  py::class_<postprocess::PostprocessParams>(m, "PostprocessParams")
      .def(py::init(&postprocess_params), py::arg("mask_use_threshold"), py::arg("mask_threshold"),
           py::arg("use_triplet"), py::arg("triplet_top"), py::arg("triplet_min_area"),
           py::arg("min_component_area"), py::arg("connectivity"));
  m.def("postprocess_masks", &postprocess_masks, py::arg("input"), py::arg("params"), py::arg("keep_image"),
        py::arg("out"), py::arg("components") = 0);
  m.def("_round_to_half_bits", &round_to_half_bits, py::arg("values"), py::arg("bfloat16"));
  m.def("rle_decode", &rle_decode, py::arg("texts"), py::arg("images"), py::arg("items"), py::arg("out"),
        py::arg("style"), py::arg("stream") = 0);
}
