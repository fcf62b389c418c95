// C++ test of nino_fast::segment_mean_csr through the dispatcher (libtorch, no Python): against a
// naive loop on empty rows, a single edge, a long row, an empty graph, non-contiguous and float64
// input, bad input, and (with a GPU and CUDA kernels) CUDA against CPU bitwise. Exits nonzero on
// any failure.
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

at::Tensor call(const at::Tensor& src, const at::Tensor& rowptr) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nino_fast::segment_mean_csr", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(src, rowptr);
}

// The specification, written as plainly as possible (float64 accumulation).
at::Tensor naive(const at::Tensor& src, const at::Tensor& rowptr) {
  const int64_t n = rowptr.numel() - 1;
  auto out = torch::zeros({n, src.size(1)}, src.options().dtype(torch::kDouble));
  for (int64_t r = 0; r < n; ++r) {
    const int64_t b = rowptr[r].item<int64_t>(), e = rowptr[r + 1].item<int64_t>();
    if (e > b) out[r] = src.slice(0, b, e).to(torch::kDouble).sum(0) / static_cast<double>(e - b);
  }
  return out.to(src.scalar_type());
}

// Message of the error `fn` throws ("" if none).
template <typename F>
std::string error_of(F fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

void check_case(const char* name, const at::Tensor& src, const at::Tensor& rowptr) {
  auto got = call(src, rowptr);
  const double tol = src.scalar_type() == torch::kDouble ? 1e-12 : 1e-5;
  expect(got.sizes() == naive(src, rowptr).sizes() &&
             torch::allclose(got, naive(src, rowptr), tol, tol),
         name);
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const auto i64 = torch::kLong;
  auto rowptr = torch::tensor({0, 3, 3, 7, 8}, i64);
  auto src = torch::randn({8, 5});
  check_case("small graph with an empty row", src, rowptr);
  expect(call(src, rowptr)[1].abs().sum().item<float>() == 0.f, "empty row is zero");
  check_case("one edge", torch::randn({1, 3}), torch::tensor({0, 1}, i64));
  check_case("rows without edges only", torch::zeros({0, 7}), torch::zeros({4}, i64));
  check_case("one row of 100000 edges", torch::randn({100000, 9}), torch::tensor({0, 100000}, i64));
  check_case("non-contiguous src", torch::randn({5, 8}).t(), rowptr);
  check_case("float64", torch::randn({8, 3}, torch::kDouble), rowptr);
  auto empty = call(torch::zeros({0, 4}), torch::zeros({1}, i64));
  expect(empty.size(0) == 0 && empty.size(1) == 4, "empty graph gives a (0, D) result");

  const std::string op = "nino_fast::segment_mean_csr: ";
  expect(contains(error_of([&] { call(src, torch::tensor({0, 2}, i64)); }),
                  op + "rowptr must start at 0 and end at E=8"),
         "bad rowptr end: error names op and argument");
  expect(contains(error_of([&] { call(src, rowptr.to(torch::kInt)); }),
                  op + "rowptr must be Long, got Int"),
         "int32 rowptr: error names op, argument, expected and received dtype");
  expect(contains(error_of([&] { call(src.flatten(), rowptr); }), op + "src must be 2-D"),
         "1-D src: error");
  expect(contains(error_of([&] { call(src.to(i64), rowptr); }), op + "src must be floating point"),
         "integer src: error");

  // The build-information op is callable from C++ too.
  static auto cuda_compiled = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("nino_fast::_cuda_compiled", "")
                                  .typed<bool()>();
  const bool has_cuda = cuda_compiled.call();
  std::printf("CUDA kernels compiled: %s\n", has_cuda ? "yes" : "no");
  if (has_cuda && torch::cuda::is_available()) {
    auto big_src = torch::randn({50000, 33});
    auto big_rowptr =
        torch::cat({torch::zeros({1}, i64), std::get<0>(torch::randint(0, 50001, {99}, i64).sort()),
                    torch::full({1}, 50000, i64)});
    auto cpu = call(big_src, big_rowptr);
    auto gpu = call(big_src.cuda(), big_rowptr.cuda()).cpu();
    expect(torch::equal(cpu, gpu), "CUDA equals CPU bitwise");
  }
  std::printf("%s\n", failures ? "FAILED" : "OK");
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
