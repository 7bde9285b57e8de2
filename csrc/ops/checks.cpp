#include "ops/checks.h"

#include <c10/core/SymBool.h>

namespace flashcomm::ops {

const char* dtype_key(c10::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    case at::kChar:
      return "int8";
    default:
      return "other";
  }
}

c10::SymInt sym_ceil_div(const c10::SymInt& a, int64_t b) { return (a + (b - 1)) / b; }

namespace {

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(),
              ", got ", t.device());
}

bool is_float_out(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                const at::Tensor& weight, bool w8a8) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.dim() == 1, op,
              ": bias must be 1-D [N] with N = weight.size(0) = ", weight.sym_size(0),
              ", got sizes ", b.sym_sizes());
  TORCH_SYM_CHECK(b.sym_size(0).sym_eq(weight.sym_size(0)), op,
                  ": bias must have N = weight.size(0) = ", weight.sym_size(0), " elements, got ",
                  b.sym_size(0));
  check_same_device(op, "bias", b, x);
  if (w8a8) {
    TORCH_CHECK(at::isFloatingType(b.scalar_type()), op,
                ": bias must be floating point (it is added in fp32), got ", b.scalar_type());
  } else {
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": bias dtype must match x (",
                x.scalar_type(), "), got ", b.scalar_type());
  }
}

void check_matmul_operands(const char* op, const at::Tensor& x, const at::Tensor& weight, bool w8a8,
                           const char* x_layout, const char* w_layout) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D ", x_layout, ", got sizes ", x.sym_sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D ", w_layout, ", got sizes ",
              weight.sym_sizes());
  TORCH_SYM_CHECK(x.sym_size(1).sym_eq(weight.sym_size(1)), op,
                  ": K mismatch: x has K = ", x.sym_size(1), " columns but weight ", w_layout,
                  " has K = ", weight.sym_size(1));
  check_same_device(op, "weight", weight, x);
  if (w8a8) {
    TORCH_CHECK(weight.scalar_type() == at::kChar, op, ": weight must be int8, got ",
                weight.scalar_type());
    TORCH_CHECK(x.scalar_type() == at::kChar || is_float_out(x.scalar_type()), op,
                ": x must be int8 or float32/float16/bfloat16, got ", x.scalar_type());
    TORCH_SYM_CHECK(weight.sym_size(1).sym_le(kMaxInt8K), op, ": K = ", weight.sym_size(1),
                    " exceeds ", kMaxInt8K,
                    ", the largest K whose int8 x int8 dot products cannot overflow int32");
  } else {
    TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
                x.scalar_type(), " (use the _w8a8 op for int8)");
    TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype must match x (",
                x.scalar_type(), "), got ", weight.scalar_type(),
                weight.scalar_type() == at::kChar ? " (use the _w8a8 op for int8 weights)" : "");
  }
}

}  // namespace

void check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, bool w8a8, const char* x_layout,
                  const char* w_layout) {
  check_matmul_operands(op, x, weight, w8a8, x_layout, w_layout);
  check_bias(op, bias, x, weight, w8a8);
}

void check_row_parallel(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, bool w8a8) {
  check_linear(op, x, weight, bias, w8a8, "[n, K_r]", "[N, K_r]");
}

void check_column_parallel(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const c10::SymInt& num_tokens,
                           int64_t tp, bool w8a8) {
  check_linear(op, x, weight, bias, w8a8, "[c, K] (this rank's token shard)", "[N_r, K]");
  TORCH_SYM_CHECK(num_tokens.sym_ge(0), op, ": num_tokens must be >= 0, got ", num_tokens);
  TORCH_SYM_CHECK(x.sym_size(0).sym_eq(sym_ceil_div(num_tokens, tp)), op, ": x has ", x.sym_size(0),
                  " rows but num_tokens = ", num_tokens, " over tp = ", tp,
                  " ranks needs ceil(num_tokens / tp) = ", sym_ceil_div(num_tokens, tp),
                  " rows per shard");
}

void check_w8a8_scales(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& weight_scale, const std::optional<at::Tensor>& input_scale,
                       const std::optional<at::Tensor>& input_zero_point,
                       c10::ScalarType out_dtype) {
  TORCH_CHECK(is_float_out(out_dtype), op, ": out_dtype must be float32, float16 or bfloat16, got ",
              out_dtype);
  TORCH_CHECK(weight_scale.scalar_type() == at::kFloat, op, ": weight_scale must be float32, got ",
              weight_scale.scalar_type());
  check_same_device(op, "weight_scale", weight_scale, x);
  const bool per_tensor_w = weight_scale.dim() <= 1 && weight_scale.sym_numel() == 1;
  const bool per_channel_w =
      (weight_scale.dim() == 1 || (weight_scale.dim() == 2 && weight_scale.sym_size(1) == 1)) &&
      weight_scale.sym_size(0) == weight.sym_size(0);
  TORCH_CHECK(per_tensor_w || per_channel_w, op,
              ": weight_scale must be per-channel [N] or [N, 1] with N = ", weight.sym_size(0),
              ", or per-tensor [1]; got sizes ", weight_scale.sym_sizes());

  const bool x_int8 = x.scalar_type() == at::kChar;
  TORCH_CHECK(!x_int8 || input_scale.has_value(), op,
              ": x is int8 (already quantised), so input_scale is required ([1] or per-token "
              "[rows, 1])");
  TORCH_CHECK(!input_zero_point.has_value() || input_scale.has_value(), op,
              ": input_zero_point given without input_scale (asymmetric quantisation needs "
              "both)");
  if (input_scale.has_value()) {
    const at::Tensor& s = *input_scale;
    TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": input_scale must be float32, got ",
                s.scalar_type());
    check_same_device(op, "input_scale", s, x);
    const bool per_tensor = s.dim() <= 1 && s.sym_numel() == 1;
    const bool per_token =
        x_int8 && s.dim() == 2 && s.sym_size(1) == 1 && s.sym_size(0) == x.sym_size(0);
    TORCH_CHECK(per_tensor || per_token, op, ": input_scale must be per-tensor [1]",
                x_int8 ? " or per-token [rows, 1] matching x's rows" : " for floating-point x",
                "; got sizes ", s.sym_sizes(), " for x of sizes ", x.sym_sizes());
  }
  if (input_zero_point.has_value()) {
    const at::Tensor& zp = *input_zero_point;
    TORCH_CHECK(zp.scalar_type() == at::kInt, op, ": input_zero_point must be int32, got ",
                zp.scalar_type());
    check_same_device(op, "input_zero_point", zp, x);
    TORCH_CHECK(zp.dim() <= 1 && zp.sym_numel() == 1, op,
                ": input_zero_point must be per-tensor [1], got sizes ", zp.sym_sizes());
    TORCH_CHECK(input_scale->sym_numel() == 1, op,
                ": input_zero_point needs a per-tensor input_scale [1]");
  }
}

void check_partial(const char* op, const at::Tensor& partial, const char* arg) {
  TORCH_CHECK(partial.dim() == 2, op, ": ", arg, " must be 2-D [n, N], got sizes ",
              partial.sym_sizes());
  TORCH_CHECK(at::isFloatingType(partial.scalar_type()), op, ": ", arg,
              " must be floating point, got ", partial.scalar_type());
}

void check_partial_inplace(const char* op, const at::Tensor& partial, const char* arg) {
  check_partial(op, partial, arg);
  TORCH_CHECK(partial.is_contiguous(), op, ": ", arg,
              " must be contiguous (it is written in place), got strides ",
              partial.sym_strides());
}

void check_norm_inplace(const char* op, const at::Tensor& x, const at::Tensor& residual,
                        const at::Tensor& weight) {
  check_norm(op, x, residual, weight);
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous(), op,
              ": x and residual must be contiguous (normed and the new residual are written "
              "into them), got strides ", x.sym_strides(), " and ", residual.sym_strides());
  TORCH_CHECK(!x.is_same(residual) && (x.sym_numel() == 0 || !x.is_alias_of(residual)), op,
              ": x and residual must not share memory (both are written)");
}

void check_norm(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [n, H], got sizes ", x.sym_sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 1, op, ": weight must be 1-D [H], got sizes ", weight.sym_sizes());
  TORCH_SYM_CHECK(weight.sym_size(0).sym_eq(x.sym_size(1)), op,
                  ": weight must have H = ", x.sym_size(1), " elements, got ", weight.sym_size(0));
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on x's device ", x.device(),
              ", got ", weight.device());
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2, op, ": residual must be 2-D [n, H] like x, got sizes ",
                residual->sym_sizes());
    TORCH_SYM_CHECK(residual->sym_size(0).sym_eq(x.sym_size(0)), op,
                    ": residual must have x's n = ", x.sym_size(0), " rows, got ",
                    residual->sym_size(0));
    TORCH_SYM_CHECK(residual->sym_size(1).sym_eq(x.sym_size(1)), op,
                    ": residual must have x's H = ", x.sym_size(1), " columns, got ",
                    residual->sym_size(1));
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op, ": residual dtype must match x (",
                x.scalar_type(), "), got ", residual->scalar_type());
    TORCH_CHECK(residual->device() == x.device(), op, ": residual must be on x's device ",
                x.device(), ", got ", residual->device());
  }
}

}  // namespace flashcomm::ops
