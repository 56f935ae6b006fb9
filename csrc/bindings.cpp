// Python bindings (module gpuload._native). No torch headers: outputs arrive as raw data pointers of
// contiguous tensors the caller owns; nothing is allocated per call; the GIL is released while copying.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <stdexcept>
#include <string>
#include <vector>

#include "fault.h"
#include "gather.h"
#include "packing.h"
#include "sampling.h"
#include "watch.h"

namespace py = pybind11;
using gpuload::Sampling;
using gpuload::ShardTable;
using Int64Array = py::array_t<int64_t, py::array::c_style>;

namespace {

// The shard table plus references to the arrays it points into: a call in flight holds `self`, so
// the memory maps outlive it even when the loader drops its own references (close()) meanwhile.
struct BoundTable {
  ShardTable table;
  py::list arrays;
  std::vector<std::string> names;  // for error messages: the shard files
  std::unique_ptr<gpuload::ShardWatch> watch;  // with identities: checks the files behind the gathers
};

using Identity = std::tuple<uint64_t, uint64_t, int64_t, int64_t, int>;  // (st_dev, st_ino, st_size, st_mtime_ns, fd)

// One watched read of a loader step (step < 0: not a loader step, e.g. a tool's read: not watched).
// Constructed and destroyed with the GIL released; the table's watch entered while it was held.
class WatchedRead {
 public:
  WatchedRead(const BoundTable& t, int64_t step) : watch_(step >= 0 ? t.watch.get() : nullptr), step_(step) {
    if (watch_ != nullptr) watch_->before_read(step_);
  }
  ~WatchedRead() {
    if (watch_ != nullptr) watch_->after_read(step_, completed_);
  }
  void complete() { completed_ = true; }

 private:
  gpuload::ShardWatch* watch_;
  int64_t step_;
  bool completed_ = false;
};

void enter_watch(const BoundTable& t) {
  if (t.watch) t.watch->enter();
}

// A read from a shard that changed under its memory map (SIGBUS), raised in Python as OSError.
struct ShardFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

BoundTable make_table(const py::list& arrays, const std::vector<std::string>& names,
                      const std::vector<std::string>& paths, const std::vector<Identity>& identities,
                      int64_t max_unverified, double watch_interval_s) {
  BoundTable t;
  t.arrays = py::list(py::tuple(arrays));  // its own list: the caller's may be cleared while the table lives
  t.names = names;
  if (!names.empty() && names.size() != arrays.size()) throw std::invalid_argument("ShardTable: one name per shard");
  if (!identities.empty()) {
    if (identities.size() != arrays.size() || paths.size() != arrays.size() || names.size() != arrays.size())
      throw std::invalid_argument("ShardTable: a watched table needs one name, path and identity per shard");
    std::vector<gpuload::FileIdentity> ids;
    for (const auto& [device, inode, size, mtime_ns, fd] : identities) ids.push_back({device, inode, size, mtime_ns, fd});
    t.watch = std::make_unique<gpuload::ShardWatch>(paths, names, ids, max_unverified, watch_interval_s);
  }
  t.table.start.push_back(0);
  for (const py::handle& item : arrays) {
    const py::array a = py::reinterpret_borrow<py::array>(item);
    if (a.ndim() != 1 || !(a.flags() & py::array::c_style) || (a.itemsize() != 2 && a.itemsize() != 4))
      throw std::invalid_argument("ShardTable: each shard must be a 1-D contiguous array of 2- or 4-byte tokens");
    if (t.table.base.empty()) t.table.token_bytes = static_cast<int>(a.itemsize());
    if (a.itemsize() != t.table.token_bytes) throw std::invalid_argument("ShardTable: shards mix token widths");
    if (a.size() < 1) throw std::invalid_argument("ShardTable: empty shard");
    t.table.base.push_back(a.data());
    t.table.start.push_back(t.table.start.back() + a.size());
  }
  if (t.table.base.empty()) throw std::invalid_argument("ShardTable: no shards");
  return t;
}

Sampling check_call(const BoundTable& t, int mode, int64_t row0, int64_t count, int64_t global_batch, int64_t seq_len) {
  if (mode < 0 || mode > 2) throw std::invalid_argument("mode must be 0 (random), 1 (shuffle) or 2 (sequential)");
  if (seq_len < 1 || t.table.num_tokens() <= seq_len) throw std::invalid_argument("need num_tokens > seq_len >= 1");
  if (row0 < 0 || count < 0 || global_batch < row0 + count) throw std::invalid_argument("need 0 <= row0 and row0 + count <= global_batch");
  return static_cast<Sampling>(mode);
}

// The chunked rule's geometry, validated like gpuload.sampling.Chunking (0 = the whole-stream rule).
gpuload::Chunking make_chunking(const BoundTable& t, int64_t global_batch, int64_t seq_len, int64_t windows_per_chunk) {
  if (windows_per_chunk == 0) return {};
  const gpuload::Chunking c(t.table.num_tokens(), seq_len, global_batch, windows_per_chunk);
  if (windows_per_chunk < global_batch || c.num_chunks < 2)
    throw std::invalid_argument("windows_per_chunk must be 0 or in [global_batch, windows per epoch)");
  return c;
}

struct GatherCall {
  const BoundTable* t;
  const int64_t* starts;
  int64_t batch, seq_len;
  void* x;
  bool x_int32;
  int64_t* y;
  const int64_t* out_rows = nullptr;  // row of x/y for each start; nullptr = rows 0 .. batch-1
  static void body(const GatherCall& c) {
    gpuload::gather_windows(c.t->table, c.starts, c.batch, c.seq_len, c.x, c.x_int32, c.y, c.out_rows);
  }
};

// A SIGBUS at `fault` while reading the maps of `t`, as ShardFault naming the shard whose pages vanished.
[[noreturn]] void raise_fault(const BoundTable& t, const void* fault) {
  const ShardTable& table = t.table;
  const auto* address = static_cast<const char*>(fault);
  for (size_t i = 0; i < table.base.size(); ++i) {
    const auto* first = static_cast<const char*>(table.base[i]);
    const int64_t bytes = (table.start[i + 1] - table.start[i]) * table.token_bytes;
    if (address >= first && address < first + bytes) {
      const std::string name = i < t.names.size() ? t.names[i] : "shard " + std::to_string(i);
      throw ShardFault(name + ": reading token " + std::to_string((address - first) / table.token_bytes) +
                       " of the memory-mapped shard failed (SIGBUS): the file was truncated or changed while "
                       "training. Restore it and restart from the last checkpoint.");
    }
  }
  throw ShardFault("SIGBUS while reading the memory-mapped shards: a shard was truncated or changed while training");
}

// Call::body(call) with SIGBUS turned into ShardFault naming the shard of call.t whose pages vanished.
template <typename Call>
void guarded(const Call& call) {
  const void* fault = gpuload::run_guarding_sigbus([](void* p) { Call::body(*static_cast<const Call*>(p)); },
                                                   const_cast<Call*>(&call));
  if (fault != nullptr) raise_fault(*call.t, fault);
}

// Packed rows straight from the planner's pieces (gpuload::gather_packed).
struct PackedCall {
  const BoundTable* t;
  gpuload::BestFitPlanner* planner;
  uint64_t step, row0, global_batch;
  int64_t count, seq_len, bos;
  bool random, x_int32;
  void* x;
  int64_t* y;
  static void body(const PackedCall& c) {
    gpuload::gather_packed(c.t->table, *c.planner, c.step, c.row0, c.count, c.global_batch, c.random, c.seq_len,
                           c.x, c.x_int32, c.y, c.bos);
  }
};

// Tokens [start, start + count) of the stream into `out`.
struct CopyCall {
  const BoundTable* t;
  int64_t start, count;
  void* out;
  static void body(const CopyCall& c) { gpuload::copy_tokens(c.t->table, c.start, c.count, c.out); }
};

void check_starts(const BoundTable& t, const int64_t* s, int64_t batch, int64_t seq_len) {
  for (int64_t b = 0; b < batch; ++b)
    if (s[b] < 0 || s[b] + seq_len >= t.table.num_tokens())
      throw std::out_of_range("window start " + std::to_string(s[b]) + " outside the stream");
}

// Rows handed in by the caller: out_rows index x and y (x_rows rows); rows, if given, a global batch.
void check_rows(const Int64Array* rows, const Int64Array& out_rows, const Int64Array& starts, int64_t global_batch,
                int64_t x_rows) {
  if (out_rows.size() != starts.size() || (rows != nullptr && rows->size() != starts.size()))
    throw std::invalid_argument("rows, out_rows and starts must have the same length");
  for (int64_t b = 0; b < starts.size(); ++b) {
    if (rows != nullptr && (rows->data()[b] < 0 || rows->data()[b] >= global_batch))
      throw std::out_of_range("row " + std::to_string(rows->data()[b]) + " outside the global batch");
    if (out_rows.data()[b] < 0 || out_rows.data()[b] >= x_rows)
      throw std::out_of_range("out row " + std::to_string(out_rows.data()[b]) + " outside x and y");
  }
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "gpuload native host code: CPU window gather and window starts";

  py::register_exception<ShardFault>(m, "ShardFault", PyExc_OSError);
  // Raised as gpuload.shards.ShardChanged, the class the Python checks raise too.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const gpuload::ShardChanged& e) {
      py::object cls = py::module_::import("gpuload.shards").attr("ShardChanged");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  m.def("mixture_rows",
        [](uint64_t seed, uint64_t step, const std::vector<int64_t>& counts, int64_t row0, Int64Array source,
           Int64Array index) {
          const int64_t count = source.size();
          int64_t rows_total = 0;
          for (int64_t c : counts) {
            if (c < 0) throw std::invalid_argument("mixture counts must be >= 0");
            rows_total += c;
          }
          if (index.size() != count || row0 < 0 || rows_total < row0 + count)
            throw std::invalid_argument("need len(source) == len(index) and row0 + len(source) <= sum(counts)");
          int64_t* src = source.mutable_data();
          int64_t* idx = index.mutable_data();
          py::gil_scoped_release release;
          gpuload::mixture_slots(seed, step, rows_total, row0, count, idx);
          for (int64_t b = 0; b < count; ++b) {
            int64_t k = 0, first = 0;
            while (idx[b] >= first + counts[k]) first += counts[k++];
            src[b] = k;
            idx[b] -= first;
          }
        },
        py::arg("seed"), py::arg("step"), py::arg("counts"), py::arg("row0"), py::arg("source").noconvert(),
        py::arg("index").noconvert(),
        "gpuload.mixture.mixture_rows for rows row0 .. row0+len(source)-1: each row's source and its index "
        "among that source's rows, into `source` and `index`.");

  m.def("aligned_starts",
        [](int mode, uint64_t seed, uint64_t step, Int64Array rows, int64_t global_batch, Int64Array doc_starts,
           std::optional<Int64Array> table, uint64_t pass0, int64_t pos0, uint64_t num_visited, Int64Array out) {
          if (mode < 0 || mode > 2) throw std::invalid_argument("mode must be 0 (random), 1 (shuffle) or 2 (sequential)");
          if (mode == 2 && table) throw std::invalid_argument("sequential rows over a table have no chunked rule");
          const int64_t count = rows.size(), num_starts = doc_starts.size();
          if (out.size() != count || num_starts < 1 || global_batch < 1)
            throw std::invalid_argument("need len(out) == len(rows), a non-empty doc_starts and global_batch >= 1");
          for (int64_t b = 0; b < count; ++b)
            if (rows.data()[b] < 0 || rows.data()[b] >= global_batch)
              throw std::out_of_range("row " + std::to_string(rows.data()[b]) + " outside the global batch");
          gpuload::AlignedTable t;
          if (table) {
            if (table->ndim() != 2 || table->shape(0) != 4 || table->shape(1) < 2 || pos0 < 0 || pos0 >= table->shape(1) - 1)
              throw std::invalid_argument("table must be AlignedChunking.pass_table (4 rows) and pos0 inside it");
            t = {table->data(), table->shape(1), pass0, num_visited, pos0};
            // Every row of the step lies in the table's two passes: [pass0 * D, (pass0 + 2) * D).
            const uint64_t first_row = step * global_batch - pass0 * num_starts;
            if (t.data[pos0] > static_cast<int64_t>(first_row) || t.data[t.len - 1] != 2 * num_starts ||
                first_row + global_batch > static_cast<uint64_t>(2 * num_starts))
              throw std::invalid_argument("the pass table does not cover this step's rows: pass0/pos0 mismatch");
          }
          const int64_t* r = rows.data();
          const int64_t* starts = doc_starts.data();
          int64_t* dst = out.mutable_data();
          py::gil_scoped_release release;
          for (int64_t b = 0; b < count; ++b)
            dst[b] = starts[gpuload::aligned_start_index(static_cast<Sampling>(mode), seed, step, r[b], global_batch,
                                                         num_starts, t)];
        },
        py::arg("mode"), py::arg("seed"), py::arg("step"), py::arg("rows").noconvert(), py::arg("global_batch"),
        py::arg("doc_starts").noconvert(), py::arg("table").noconvert(), py::arg("pass0"), py::arg("pos0"),
        py::arg("num_visited"), py::arg("out").noconvert(),
        "gpuload.documents.aligned_window_starts for global rows `rows` into `out`: table None for the "
        "whole-stream rule, else AlignedChunking.pass_table(seed, pass0) with pos0 the position of the step's "
        "first row.");

  py::class_<gpuload::BestFitPlanner>(m, "BestFitPlanner")
      .def(py::init<std::vector<int64_t>, int64_t, int64_t, uint64_t, int64_t, bool>(), py::arg("doc_starts"),
           py::arg("num_tokens"), py::arg("seq_len"), py::arg("seed"), py::arg("group_docs"), py::arg("remainder"),
           "gpuload.packing.BestFitPacking in C++: the documents starting at the sorted `doc_starts` of a stream of "
           "`num_tokens`, packed into rows of seq_len + 1 tokens.")
      .def_property_readonly("epoch_rows", &gpuload::BestFitPlanner::epoch_rows)
      .def_property_readonly("max_pieces", &gpuload::BestFitPlanner::max_pieces)
      .def_property_readonly("num_groups", &gpuload::BestFitPlanner::num_groups)
      .def_property_readonly("group_rows", &gpuload::BestFitPlanner::group_rows)
      .def("document_starts",
           [](const gpuload::BestFitPlanner& p) { return py::array_t<int64_t>(py::cast(p.document_starts())); },
           "The documents' starts it was made from, sorted, to deal them again with another seed.")
      .def("pack",
           [](const gpuload::BestFitPlanner& p, int64_t group, uint64_t epoch) {
             if (group < 0 || group >= p.num_groups()) throw std::out_of_range("group outside the packing");
             py::list rows;
             for (const auto& row : p.pack(group, epoch)) {
               py::list pieces;
               for (const auto& piece : row) pieces.append(py::make_tuple(piece.start, piece.length, piece.bos));
               rows.append(pieces);
             }
             return rows;
           },
           py::arg("group"), py::arg("epoch"), "Group `group`'s rows at `epoch`, each a list of (start, length, bos).")
      .def("rows_positions",
           [](gpuload::BestFitPlanner& p, uint64_t step, uint64_t row0, uint64_t global_batch, bool random,
              py::array_t<int64_t, py::array::c_style> out) {
             if (out.ndim() != 2 || row0 + out.shape(0) > global_batch)
               throw std::invalid_argument("out must be (count, seq_len + 1) int64 with row0 + count <= global_batch");
             const int64_t count = out.shape(0);
             int64_t* dst = out.mutable_data();
             py::gil_scoped_release release;
             p.positions(step, row0, count, global_batch, random, dst);
           },
           py::arg("step"), py::arg("row0"), py::arg("global_batch"), py::arg("random"), py::arg("out").noconvert(),
           "Global rows row0 .. row0+len(out)-1 at `step` as stream positions into `out` (-1: a BOS not in the "
           "stream).");

  py::class_<BoundTable>(m, "ShardTable")
      .def(py::init(&make_table), py::arg("arrays"), py::arg("names") = std::vector<std::string>{},
           py::arg("paths") = std::vector<std::string>{}, py::arg("identities") = std::vector<Identity>{},
           py::arg("max_unverified") = 1024, py::arg("watch_interval_s") = 0.1,
           "Shards as 1-D token arrays (memory maps) in stream order, kept alive by the table; `names` (the "
           "files) label errors. With `identities` ((st_dev, st_ino, st_size, st_mtime_ns) per shard, as opened) "
           "and `paths` (bytes, absolute), a thread compares the files at `paths` with them every "
           "`watch_interval_s` while gathers run, and a gather of a step returns at most `max_unverified` "
           "batches read since the start of the last clean comparison (gpuload/shards.py, README \"Faults\").")
      .def_property_readonly("num_tokens", [](const BoundTable& t) { return t.table.num_tokens(); })
      .def_property_readonly("max_unverified",
                             [](const BoundTable& t) { return t.watch ? t.watch->max_unverified() : 0; })
      .def("check",
           [](const BoundTable& t) {
             if (!t.watch) return std::string();
             py::gil_scoped_release release;
             return t.watch->check_now();
           },
           "One comparison of every shard file with its identity now: '' or the first change found.")
      .def("read",
           [](const BoundTable& t, int64_t start, uintptr_t out, int64_t count) {
             if (start < 0 || count < 0 || start > t.table.num_tokens() || count > t.table.num_tokens() - start)
               throw std::out_of_range("tokens [" + std::to_string(start) + ", +" + std::to_string(count) +
                                       ") outside the stream");
             py::gil_scoped_release release;
             // Checked after the copy (a change before it shows now, so what landed in `out` is the original),
             // and after a fault: a truncated shard's lost pages are a changed shard like any other.
             const auto check = [&] {
               if (!t.watch || count == 0) return;
               const auto& first = t.table.start;
               const size_t a = std::upper_bound(first.begin(), first.end(), start) - first.begin() - 1;
               const size_t b = std::upper_bound(first.begin(), first.end(), start + count - 1) - first.begin();
               const std::string change = t.watch->check_range(a, b);
               if (!change.empty())
                 throw gpuload::ShardChanged(change + " after the loader opened it; gpuload reads a shard as it was "
                                             "when the loader opened it, and this one no longer is.");
             };
             try {
               guarded(CopyCall{&t, start, count, reinterpret_cast<void*>(out)});
             } catch (const ShardFault&) {
               check();
               throw;
             }
             check();
           },
           py::arg("start"), py::arg("out"), py::arg("count"),
           "Tokens [start, start + count) of the stream from the maps into `out` (a data pointer to `count` "
           "tokens of the stream's width), GIL released; SIGBUS (a truncated shard) raises ShardFault; a watched "
           "table then checks the shards read against their identities (ShardChanged).")
      .def("window_starts",
           [](const BoundTable& t, int mode, uint64_t seed, uint64_t step, int64_t row0, int64_t global_batch,
              int64_t seq_len, Int64Array out, int64_t windows_per_chunk) {
             const int64_t count = out.size();
             const Sampling s = check_call(t, mode, row0, count, global_batch, seq_len);
             const gpuload::Chunking chunking = make_chunking(t, global_batch, seq_len, windows_per_chunk);
             int64_t* dst = out.mutable_data();
             py::gil_scoped_release release;
             gpuload::window_starts(s, seed, step, row0, count, global_batch, t.table.num_tokens(), seq_len, chunking, dst);
           },
           py::arg("mode"), py::arg("seed"), py::arg("step"), py::arg("row0"), py::arg("global_batch"),
           py::arg("seq_len"), py::arg("out").noconvert(), py::arg("windows_per_chunk") = 0,
           "Window starts of rows row0 .. row0+len(out)-1; windows_per_chunk > 0 selects the chunked rule.")
      .def("gather",
           [](const BoundTable& t, Int64Array starts, int64_t seq_len, uintptr_t x, bool x_int32, uintptr_t y,
              int64_t step) {
             check_call(t, 0, 0, 0, 0, seq_len);
             const int64_t batch = starts.size();
             check_starts(t, starts.data(), batch, seq_len);
             enter_watch(t);
             py::gil_scoped_release release;
             WatchedRead read(t, step);
             guarded(GatherCall{&t, starts.data(), batch, seq_len, reinterpret_cast<void*>(x), x_int32,
                             reinterpret_cast<int64_t*>(y)});
             read.complete();
           },
           py::arg("starts").noconvert(), py::arg("seq_len"), py::arg("x"), py::arg("x_int32"), py::arg("y"),
           py::arg("step") = -1,
           "x, y: data pointers of contiguous (len(starts), seq_len) tensors (x int32 or int64, y int64); `step` "
           "the loader step the batch is for (watched), -1 for none.")
      .def("gather_packed",
           [](const BoundTable& t, gpuload::BestFitPlanner& planner, uint64_t step, uint64_t row0,
              uint64_t global_batch, bool random, int64_t count, int64_t seq_len, uintptr_t x, bool x_int32,
              uintptr_t y, int64_t bos) {
             if (count < 1 || seq_len < 1 || row0 + count > global_batch)
               throw std::invalid_argument("need count >= 1, seq_len >= 1 and row0 + count <= global_batch");
             enter_watch(t);
             py::gil_scoped_release release;
             WatchedRead read(t, static_cast<int64_t>(step));
             guarded(PackedCall{&t, &planner, step, row0, global_batch, count, seq_len, bos, random, x_int32,
                                    reinterpret_cast<void*>(x), reinterpret_cast<int64_t*>(y)});
             read.complete();
           },
           py::arg("planner"), py::arg("step"), py::arg("row0"), py::arg("global_batch"), py::arg("random"),
           py::arg("count"), py::arg("seq_len"), py::arg("x"), py::arg("x_int32"), py::arg("y"), py::arg("bos"),
           "pack='bestfit': global rows row0 .. row0+count-1 at `step`, planned by `planner` (a BestFitPlanner of "
           "this stream), into x and y (contiguous (count, seq_len)); a piece's synthetic BOS is `bos`.")
      .def("sample_and_gather",
           [](const BoundTable& t, int mode, uint64_t seed, uint64_t step, int64_t row0, int64_t global_batch,
              int64_t seq_len, Int64Array starts, uintptr_t x, bool x_int32, uintptr_t y, int64_t windows_per_chunk) {
             const int64_t batch = starts.size();
             const Sampling s = check_call(t, mode, row0, batch, global_batch, seq_len);
             const gpuload::Chunking chunking = make_chunking(t, global_batch, seq_len, windows_per_chunk);
             int64_t* dst = starts.mutable_data();
             enter_watch(t);
             py::gil_scoped_release release;
             gpuload::window_starts(s, seed, step, row0, batch, global_batch, t.table.num_tokens(), seq_len, chunking, dst);
             WatchedRead read(t, static_cast<int64_t>(step));
             guarded(GatherCall{&t, dst, batch, seq_len, reinterpret_cast<void*>(x), x_int32,
                             reinterpret_cast<int64_t*>(y)});
             read.complete();
           },
           py::arg("mode"), py::arg("seed"), py::arg("step"), py::arg("row0"), py::arg("global_batch"),
           py::arg("seq_len"), py::arg("starts").noconvert(), py::arg("x"), py::arg("x_int32"), py::arg("y"),
           py::arg("windows_per_chunk") = 0,
           "Window starts of rows row0 .. row0+len(starts)-1 into `starts`, then their gather into x and y.")
      .def("gather_rows",
           [](const BoundTable& t, Int64Array starts, int64_t seq_len, Int64Array out_rows, uintptr_t x, bool x_int32,
              uintptr_t y, int64_t x_rows, int64_t step) {
             check_call(t, 0, 0, 0, 0, seq_len);
             check_rows(nullptr, out_rows, starts, 0, x_rows);
             const int64_t batch = starts.size();
             check_starts(t, starts.data(), batch, seq_len);
             enter_watch(t);
             py::gil_scoped_release release;
             WatchedRead read(t, step);
             guarded(GatherCall{&t, starts.data(), batch, seq_len, reinterpret_cast<void*>(x), x_int32,
                             reinterpret_cast<int64_t*>(y), out_rows.data()});
             read.complete();
           },
           py::arg("starts").noconvert(), py::arg("seq_len"), py::arg("out_rows").noconvert(), py::arg("x"),
           py::arg("x_int32"), py::arg("y"), py::arg("x_rows"), py::arg("step") = -1,
           "The window at starts[b] into row out_rows[b] of x and y, contiguous (x_rows, seq_len) tensors.")
      .def("sample_rows_and_gather",
           [](const BoundTable& t, int mode, uint64_t seed, uint64_t step, Int64Array rows, int64_t global_batch,
              int64_t seq_len, Int64Array out_rows, Int64Array starts, uintptr_t x, bool x_int32, uintptr_t y,
              int64_t x_rows, int64_t windows_per_chunk) {
             const Sampling s = check_call(t, mode, 0, 0, global_batch, seq_len);
             check_rows(&rows, out_rows, starts, global_batch, x_rows);
             const gpuload::Chunking chunking = make_chunking(t, global_batch, seq_len, windows_per_chunk);
             const int64_t batch = rows.size();
             int64_t* dst = starts.mutable_data();
             enter_watch(t);
             py::gil_scoped_release release;
             gpuload::window_starts_of_rows(s, seed, step, rows.data(), batch, global_batch, t.table.num_tokens(),
                                            seq_len, chunking, dst);
             WatchedRead read(t, static_cast<int64_t>(step));
             guarded(GatherCall{&t, dst, batch, seq_len, reinterpret_cast<void*>(x), x_int32,
                             reinterpret_cast<int64_t*>(y), out_rows.data()});
             read.complete();
           },
           py::arg("mode"), py::arg("seed"), py::arg("step"), py::arg("rows").noconvert(), py::arg("global_batch"),
           py::arg("seq_len"), py::arg("out_rows").noconvert(), py::arg("starts").noconvert(), py::arg("x"),
           py::arg("x_int32"), py::arg("y"), py::arg("x_rows"), py::arg("windows_per_chunk") = 0,
           "Window starts of global rows `rows` (of a global batch of global_batch rows) into `starts`, and "
           "their gather into rows out_rows of x and y, contiguous (x_rows, seq_len) tensors.");
}
