// The CPU 4-bit linear as torch operators: `lightning_qlora::linear4bit` (x @ W.T + bias) and
// `lightning_qlora::linear4bit_input_grad` (grad @ W), W dequantized a band of rows at a time.
//
// Why operators in C++: the band loop used to run in Python with a ctypes kernel that started its own POSIX
// threads on every call, beside torch's OpenMP pool whose workers spin after each matmul. Two cores then
// held three runnable threads, and with any other program running each dequantization waited for a
// scheduler slice (see benchmarks/README.md). Here the dequantization runs in torch's own pool
// (at::parallel_for), no thread is ever created, and the operators are opaque to torch.compile, which
// traces them through their fake implementations (registered in Python, with the autograd formula).
//
// The arithmetic is that of the Python path it replaces, call for call: `dequant4bit.c` (included below)
// decodes each value exactly as bitsandbytes does, and the same matmul calls run on the same shapes (one
// linear / matmul for the whole weight, mm into column bands then `+= bias` for bands), so results are
// bit-identical.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

// Compiled here as C++ (internal linkage does not matter: nothing is looked up by name).
#include "dequant4bit.c"

namespace {

constexpr int64_t kAbiVersion = 1;
// Below this many values per thread, one thread is faster than waking others (as the ctypes wrapper).
constexpr int64_t kValuesPerThread = int64_t{1} << 18;

// One reused band buffer per dtype and thread: dequantizing into a fresh tensor each call would fault in
// a band's pages again every forward and backward. Per thread, like the Python workspace.
struct Workspace {
  at::Tensor f32, bf16, f16;
  at::Tensor& slot(at::ScalarType t) {
    return t == at::kFloat ? f32 : (t == at::kBFloat16 ? bf16 : f16);
  }
};
thread_local Workspace workspace;

at::Tensor band_buffer(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  at::Tensor& buffer = workspace.slot(options.dtype().toScalarType());
  const int64_t numel = rows * cols;
  if (!buffer.defined() || buffer.numel() < numel) {
    buffer = at::Tensor();  // free the smaller buffer first
    c10::InferenceMode normal(false);  // an ordinary tensor even when called under inference mode
    buffer = at::empty({numel}, options);
  }
  return buffer.narrow(0, 0, numel).view({rows, cols});
}

int out_kind(at::ScalarType t) {
  return t == at::kFloat ? LQ_OUT_F32 : (t == at::kBFloat16 ? LQ_OUT_BF16 : LQ_OUT_F16);
}

// The packed weight and its quantization constants, checked once per call.
struct Weight {
  const uint8_t* packed;
  const float* code;
  const float* absmax_f32;
  const uint8_t* absmax_u8;
  const float* nested_code;
  const float* nested_absmax;
  int64_t nested_blocksize;
  float offset;
  int64_t blocksize;
  int64_t rows;
  int64_t cols;
};

void check_cpu_contiguous(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "linear4bit: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "linear4bit: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "linear4bit: ", name, " must be contiguous");
}

Weight make_weight(const at::Tensor& packed, const at::Tensor& code, const at::Tensor& absmax,
                   const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& nested_absmax,
                   const std::optional<at::Tensor>& offset, int64_t nested_blocksize, int64_t blocksize,
                   int64_t rows, int64_t cols) {
  TORCH_CHECK(rows > 0 && cols > 0, "linear4bit: the weight must have a positive shape, got ", rows, " x ", cols);
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "linear4bit: blocksize must be a positive even integer, got ",
              blocksize);
  const int64_t n = rows * cols;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  check_cpu_contiguous(packed, "packed", at::kByte);
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "linear4bit: packed must hold ", (n + 1) / 2, " bytes for a ", rows,
              " x ", cols, " weight, got ", packed.numel());
  check_cpu_contiguous(code, "code", at::kFloat);
  TORCH_CHECK(code.numel() == 16, "linear4bit: code must have 16 values, got ", code.numel());
  Weight w{packed.data_ptr<uint8_t>(), code.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr,
           1, 0.0f, blocksize, rows, cols};
  const bool nested = nested_code.has_value() || nested_absmax.has_value() || offset.has_value();
  if (nested) {
    TORCH_CHECK(nested_code.has_value() && nested_absmax.has_value() && offset.has_value(),
                "linear4bit: double quantization needs nested_code, nested_absmax and offset");
    TORCH_CHECK(offset->numel() == 1 && offset->scalar_type() == at::kFloat && offset->device().is_cpu(),
                "linear4bit: offset must be one float32 value on the CPU, got ", offset->scalar_type(), " with ",
                offset->numel(), " values");
    TORCH_CHECK(nested_blocksize > 0, "linear4bit: nested_blocksize must be positive, got ", nested_blocksize);
    check_cpu_contiguous(absmax, "absmax", at::kByte);
    check_cpu_contiguous(*nested_code, "nested_code", at::kFloat);
    check_cpu_contiguous(*nested_absmax, "nested_absmax", at::kFloat);
    TORCH_CHECK(nested_code->numel() == 256, "linear4bit: nested_code must have 256 values, got ",
                nested_code->numel());
    const int64_t nested_blocks = (nblocks + nested_blocksize - 1) / nested_blocksize;
    TORCH_CHECK(nested_absmax->numel() == nested_blocks, "linear4bit: nested_absmax must have ", nested_blocks,
                " values, got ", nested_absmax->numel());
    w.absmax_u8 = absmax.data_ptr<uint8_t>();
    w.nested_code = nested_code->data_ptr<float>();
    w.nested_absmax = nested_absmax->data_ptr<float>();
    w.nested_blocksize = nested_blocksize;
    w.offset = offset->item<float>();
  } else {
    check_cpu_contiguous(absmax, "absmax", at::kFloat);
    w.absmax_f32 = absmax.data_ptr<float>();
  }
  TORCH_CHECK(absmax.numel() == nblocks, "linear4bit: absmax must have one value per block (", nblocks, "), got ",
              absmax.numel());
  return w;
}

// Rows [first, first + band.size(0)) of the weight into `band`, split over torch's threads by whole blocks.
// A band starts where a block (a block of nested blocks when double-quantized) starts: the caller's
// tile_rows guarantees it, checked here.
void dequantize_rows(const Weight& w, int64_t first, at::Tensor& band) {
  const int64_t begin = first * w.cols;
  const int64_t n = band.numel();
  const int64_t step = w.blocksize * (w.absmax_f32 != nullptr ? 1 : w.nested_blocksize);
  TORCH_CHECK(begin % step == 0, "linear4bit: a band of rows must start a block; row ", first, " does not (",
              step, " values per block)");
  const int64_t block = begin / w.blocksize;
  lq_job base{};
  base.packed = w.packed + begin / 2;
  base.code = w.code;
  base.absmax_f32 = w.absmax_f32 != nullptr ? w.absmax_f32 + block : nullptr;
  base.absmax_u8 = w.absmax_u8 != nullptr ? w.absmax_u8 + block : nullptr;
  base.nested_code = w.nested_code;
  base.nested_absmax = w.nested_absmax != nullptr ? w.nested_absmax + block / w.nested_blocksize : nullptr;
  base.nested_blocksize = w.nested_blocksize;
  base.offset = w.offset;
  base.blocksize = w.blocksize;
  base.n = n;
  base.out = band.data_ptr();
  base.out_kind = out_kind(band.scalar_type());
  const int64_t nblocks = (n + w.blocksize - 1) / w.blocksize;
  const int64_t grain = std::max<int64_t>(1, kValuesPerThread / w.blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    lq_job job = base;
    job.block_begin = b0;
    job.block_end = b1;
    run_blocks(&job);
  });
}

void check_activation(const at::Tensor& t, const char* name, int64_t features) {
  TORCH_CHECK(t.device().is_cpu(), "linear4bit: ", name, " must be on the CPU, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "linear4bit: ", name,
              " must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == features, "linear4bit: ", name, "'s last dimension must be ",
              features, ", got shape ", t.sizes());
}

at::Tensor linear4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& code,
                      const at::Tensor& absmax, const std::optional<at::Tensor>& nested_code,
                      const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                      int64_t nested_blocksize, int64_t blocksize, int64_t out_features, int64_t tile_rows,
                      const std::optional<at::Tensor>& bias) {
  const int64_t cols = x.dim() >= 1 ? x.size(-1) : 0;
  check_activation(x, "x", cols);
  TORCH_CHECK(tile_rows > 0, "linear4bit: tile_rows must be positive, got ", tile_rows);
  const Weight w = make_weight(packed, code, absmax, nested_code, nested_absmax, offset, nested_blocksize,
                               blocksize, out_features, cols);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == out_features,
                "linear4bit: bias must be a ", x.scalar_type(), " vector of ", out_features, " values");
  }
  if (tile_rows >= out_features) {  // one band is the whole weight
    at::Tensor weight = band_buffer(out_features, cols, x.options());
    dequantize_rows(w, 0, weight);
    return at::linear(x, weight, bias);
  }
  const at::Tensor x2 = x.reshape({-1, cols});
  at::Tensor out = at::empty({x2.size(0), out_features}, x.options());
  at::Tensor band = band_buffer(tile_rows, cols, x.options());
  for (int64_t first = 0; first < out_features; first += tile_rows) {
    const int64_t last = std::min(first + tile_rows, out_features);
    at::Tensor weight = band.narrow(0, 0, last - first);
    dequantize_rows(w, first, weight);
    at::Tensor columns = out.narrow(1, first, last - first);
    at::mm_out(columns, x2, weight.t());  // BLAS writes the column band in place
  }
  if (bias.has_value()) {
    out += *bias;
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return out.view(shape);
}

at::Tensor linear4bit_input_grad(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& code,
                                 const at::Tensor& absmax, const std::optional<at::Tensor>& nested_code,
                                 const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& offset, int64_t nested_blocksize, int64_t blocksize, int64_t in_features, int64_t tile_rows) {
  const int64_t rows = grad.dim() >= 1 ? grad.size(-1) : 0;
  check_activation(grad, "grad", rows);
  TORCH_CHECK(tile_rows > 0, "linear4bit: tile_rows must be positive, got ", tile_rows);
  const Weight w = make_weight(packed, code, absmax, nested_code, nested_absmax, offset, nested_blocksize,
                               blocksize, rows, in_features);
  if (tile_rows >= rows) {
    at::Tensor weight = band_buffer(rows, in_features, grad.options());
    dequantize_rows(w, 0, weight);
    return at::matmul(grad, weight);
  }
  const at::Tensor grad2 = grad.reshape({-1, rows});
  at::Tensor grad_x = at::empty({grad2.size(0), in_features}, grad.options());
  at::Tensor band = band_buffer(tile_rows, in_features, grad.options());
  for (int64_t first = 0; first < rows; first += tile_rows) {
    const int64_t last = std::min(first + tile_rows, rows);
    at::Tensor weight = band.narrow(0, 0, last - first);
    dequantize_rows(w, first, weight);
    const at::Tensor g = grad2.narrow(1, first, last - first);
    if (first == 0) {
      at::mm_out(grad_x, g, weight);
    } else {
      grad_x.addmm_(g, weight);
    }
  }
  std::vector<int64_t> shape(grad.sizes().begin(), grad.sizes().end());
  shape.back() = in_features;
  return grad_x.view(shape);
}

int64_t abi_version() { return kAbiVersion; }

int64_t simd_level() { return lq_simd_level(); }

int64_t workspace_bytes() {
  int64_t total = 0;
  for (const at::Tensor* t : {&workspace.f32, &workspace.bf16, &workspace.f16}) {
    if (t->defined()) {
      total += t->numel() * static_cast<int64_t>(t->element_size());
    }
  }
  return total;
}

void release_workspace() { workspace = Workspace(); }

}  // namespace

TORCH_LIBRARY(lightning_qlora, m) {
  m.def(
      "linear4bit(Tensor x, Tensor packed, Tensor code, Tensor absmax, Tensor? nested_code, "
      "Tensor? nested_absmax, Tensor? offset, int nested_blocksize, int blocksize, int out_features, "
      "int tile_rows, Tensor? bias) -> Tensor");
  m.def(
      "linear4bit_input_grad(Tensor grad, Tensor packed, Tensor code, Tensor absmax, Tensor? nested_code, "
      "Tensor? nested_absmax, Tensor? offset, int nested_blocksize, int blocksize, int in_features, "
      "int tile_rows) -> Tensor");
  m.def("linear4bit_abi_version() -> int", &abi_version);
  m.def("linear4bit_simd_level() -> int", &simd_level);
  m.def("linear4bit_workspace_bytes() -> int", &workspace_bytes);
  m.def("linear4bit_release_workspace() -> ()", &release_workspace);
}

TORCH_LIBRARY_IMPL(lightning_qlora, CPU, m) {
  m.impl("linear4bit", &linear4bit);
  m.impl("linear4bit_input_grad", &linear4bit_input_grad);
}
