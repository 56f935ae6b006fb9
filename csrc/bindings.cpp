// Python bindings (module gpuload._native). Raw pointers in, nothing allocated per call, GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "gather.h"

namespace py = pybind11;
using gpuload::Sampling;
using gpuload::ShardTable;

namespace {

ShardTable make_table(const std::vector<uintptr_t>& base, const std::vector<int64_t>& start, int token_bytes) {
  if (token_bytes != 2 && token_bytes != 4) throw std::invalid_argument("token_bytes must be 2 or 4");
  if (start.size() != base.size() + 1 || base.empty()) throw std::invalid_argument("need len(start) == len(base) + 1 >= 2");
  ShardTable t;
  for (uintptr_t p : base) t.base.push_back(reinterpret_cast<const void*>(p));
  t.start = start;
  t.token_bytes = token_bytes;
  return t;
}

void check_shape(const ShardTable& t, int64_t seq_len) {
  if (seq_len < 1 || t.num_tokens() <= seq_len) throw std::invalid_argument("need num_tokens > seq_len >= 1");
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "gpuload native host code: CPU window gather and window starts";

  py::class_<ShardTable>(m, "ShardTable")
      .def(py::init(&make_table), py::arg("base"), py::arg("start"), py::arg("token_bytes"))
      .def_property_readonly("num_tokens", &ShardTable::num_tokens)
      .def("window_starts",
           [](const ShardTable& t, int mode, uint64_t seed, uint64_t step, int64_t row0, int64_t count,
              int64_t global_batch, int64_t seq_len, uintptr_t starts) {
             check_shape(t, seq_len);
             py::gil_scoped_release release;
             gpuload::window_starts(static_cast<Sampling>(mode), seed, step, row0, count, global_batch,
                                    t.num_tokens(), seq_len, reinterpret_cast<int64_t*>(starts));
           },
           py::arg("mode"), py::arg("seed"), py::arg("step"), py::arg("row0"), py::arg("count"),
           py::arg("global_batch"), py::arg("seq_len"), py::arg("starts"))
      .def("gather",
           [](const ShardTable& t, uintptr_t starts, int64_t batch, int64_t seq_len, uintptr_t x, bool x_int32,
              uintptr_t y, int threads) {
             check_shape(t, seq_len);
             const auto* s = reinterpret_cast<const int64_t*>(starts);
             for (int64_t b = 0; b < batch; ++b)
               if (s[b] < 0 || s[b] + seq_len >= t.num_tokens()) throw std::out_of_range("window start outside the stream");
             py::gil_scoped_release release;
             gpuload::gather_windows(t, s, batch, seq_len,
                                     reinterpret_cast<void*>(x), x_int32, reinterpret_cast<int64_t*>(y), threads);
           },
           py::arg("starts"), py::arg("batch"), py::arg("seq_len"), py::arg("x"), py::arg("x_int32"), py::arg("y"),
           py::arg("threads") = 1)
      .def("sample_and_gather",
           [](const ShardTable& t, int mode, uint64_t seed, uint64_t step, int64_t row0, int64_t batch,
              int64_t global_batch, int64_t seq_len, uintptr_t starts, uintptr_t x, bool x_int32, uintptr_t y,
              int threads) {
             check_shape(t, seq_len);
             py::gil_scoped_release release;
             auto* s = reinterpret_cast<int64_t*>(starts);
             gpuload::window_starts(static_cast<Sampling>(mode), seed, step, row0, batch, global_batch,
                                    t.num_tokens(), seq_len, s);
             gpuload::gather_windows(t, s, batch, seq_len, reinterpret_cast<void*>(x), x_int32,
                                     reinterpret_cast<int64_t*>(y), threads);
           },
           py::arg("mode"), py::arg("seed"), py::arg("step"), py::arg("row0"), py::arg("batch"),
           py::arg("global_batch"), py::arg("seq_len"), py::arg("starts"), py::arg("x"), py::arg("x_int32"),
           py::arg("y"), py::arg("threads") = 1);
}
