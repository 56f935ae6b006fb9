// Python bindings (module gpuload._native). Raw pointers in, nothing allocated per call, GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "fill.h"
#include "gather.h"

namespace py = pybind11;
using gpuload::Sampling;
using gpuload::ShardFiles;
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

  // A shard read failure becomes OSError (FileNotFoundError etc. when errno says so), like Python's own I/O.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const gpuload::ShardReadError& e) {
      if (e.err() == 0) return PyErr_SetString(PyExc_OSError, e.what());
      py::object args = py::make_tuple(e.err(), e.what());
      PyErr_SetObject(PyExc_OSError, args.ptr());
    }
  });

  py::class_<ShardFiles>(m, "ShardFiles",
                         "The shard files, opened once; fill() preads tokens of the stream into caller memory.")
      .def(py::init<const std::vector<std::string>&, const std::vector<int64_t>&, const std::vector<int64_t>&, int,
                    int64_t, bool>(),
           py::arg("paths"), py::arg("offsets"), py::arg("counts"), py::arg("token_bytes"),
           py::arg("request_bytes") = gpuload::kDefaultRequestBytes, py::arg("advise") = false)
      .def("fill",
           [](ShardFiles& f, uintptr_t dst, int64_t start, int64_t count, int threads) {
             py::gil_scoped_release release;
             f.fill(reinterpret_cast<void*>(dst), start, count, threads);
           },
           py::arg("dst"), py::arg("start"), py::arg("count"), py::arg("threads") = 0,
           "Tokens [start, start+count) into the count * token_bytes bytes at address dst (threads=0: auto).")
      .def("close", [](ShardFiles& f) {
             py::gil_scoped_release release;  // waits for fills in flight, which need no GIL
             f.close();
           })
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](ShardFiles& f, py::args) {
             py::gil_scoped_release release;
             f.close();
           })
      .def("auto_threads", &ShardFiles::auto_threads, py::arg("count"))
      .def_property_readonly("num_tokens", &ShardFiles::num_tokens)
      .def_property_readonly("token_bytes", &ShardFiles::token_bytes)
      .def_property_readonly("request_bytes", &ShardFiles::request_bytes)
      .def_property_readonly("advise", &ShardFiles::advise)
      .def_property_readonly("num_files", &ShardFiles::num_files)
      .def_property_readonly("closed", &ShardFiles::closed)
      .def("__len__", &ShardFiles::num_tokens);

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
