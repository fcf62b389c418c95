// C++ test of nino_fast::segment_mean_csr through the dispatcher (libtorch, no Python): against a
// naive loop, on empty rows, an empty graph, and bad input.
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

at::Tensor call(const at::Tensor& src, const at::Tensor& rowptr) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nino_fast::segment_mean_csr", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(src, rowptr);
}

at::Tensor naive(const at::Tensor& src, const at::Tensor& rowptr) {
  auto n = rowptr.numel() - 1;
  auto out = torch::zeros({n, src.size(1)}, src.options());
  for (int64_t r = 0; r < n; ++r) {
    auto b = rowptr[r].item<int64_t>(), e = rowptr[r + 1].item<int64_t>();
    if (e > b) out[r] = src.slice(0, b, e).sum(0) / static_cast<double>(e - b);
  }
  return out;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  auto rowptr = torch::tensor({0, 3, 3, 7, 8}, torch::kLong);
  auto src = torch::randn({8, 5});
  expect(torch::allclose(call(src, rowptr), naive(src, rowptr), 1e-6, 1e-6), "matches the naive loop");
  expect(call(src, rowptr)[1].abs().sum().item<float>() == 0.f, "empty row is zero");
  auto empty = call(torch::zeros({0, 4}), torch::zeros({1}, torch::kLong));
  expect(empty.size(0) == 0 && empty.size(1) == 4, "empty graph");
  bool threw = false;
  try {
    call(src, torch::tensor({0, 2}, torch::kLong));
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("nino_fast::segment_mean_csr: rowptr") != std::string::npos;
  }
  expect(threw, "bad rowptr raises an error naming the op and argument");
  std::printf("%s\n", failures ? "FAILED" : "OK");
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
