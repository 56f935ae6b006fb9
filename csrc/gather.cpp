#include "gather.h"

#include <algorithm>
#include <cstring>

namespace gpuload {
namespace {

template <typename Src, typename X>
void copy_row(const ShardTable& shards, int64_t start, int64_t seq_len, X* x, int64_t* y) {
  // Shard holding `start`: the last one whose first token is <= start.
  size_t s = std::upper_bound(shards.start.begin(), shards.start.end(), start) - shards.start.begin() - 1;
  int64_t k = 0;  // position inside the window [0, T]
  while (k <= seq_len) {
    const int64_t local = start + k - shards.start[s];
    const int64_t n = std::min(seq_len + 1 - k, shards.start[s + 1] - shards.start[s] - local);
    const Src* src = static_cast<const Src*>(shards.base[s]) + local;
    // Token k of the window goes to x[k] (k < T) and y[k-1] (k >= 1).
    const int64_t x_end = std::min(n, seq_len - k);
    for (int64_t i = 0; i < x_end; ++i) x[k + i] = static_cast<X>(src[i]);
    for (int64_t i = (k == 0 ? 1 : 0); i < n; ++i) y[k + i - 1] = static_cast<int64_t>(src[i]);
    k += n;
    ++s;
  }
}

// One thread: at B*T = 32K tokens the gather runs at ~33 us, at the speed of a contiguous numpy
// convert-copy of the same bytes (benchmarks/bench_cpu_gather.py), so there is nothing to split.
template <typename Src, typename X>
void gather_typed(const ShardTable& shards, const int64_t* starts, int64_t batch, int64_t seq_len, X* x, int64_t* y,
                  const int64_t* out_rows) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t row = out_rows == nullptr ? b : out_rows[b];
    copy_row<Src, X>(shards, starts[b], seq_len, x + row * seq_len, y + row * seq_len);
  }
}

}  // namespace

void gather_windows(const ShardTable& shards, const int64_t* starts, int64_t batch, int64_t seq_len,
                    void* x, bool x_int32, int64_t* y, const int64_t* out_rows) {
  auto* x32 = static_cast<int32_t*>(x);
  auto* x64 = static_cast<int64_t*>(x);
  if (shards.token_bytes == 2) {
    if (x_int32) return gather_typed<uint16_t, int32_t>(shards, starts, batch, seq_len, x32, y, out_rows);
    return gather_typed<uint16_t, int64_t>(shards, starts, batch, seq_len, x64, y, out_rows);
  }
  if (x_int32) return gather_typed<uint32_t, int32_t>(shards, starts, batch, seq_len, x32, y, out_rows);
  return gather_typed<uint32_t, int64_t>(shards, starts, batch, seq_len, x64, y, out_rows);
}

namespace {

template <typename Src, typename X>
void gather_run_typed(const ShardTable& shards, int64_t start, int64_t count, int64_t col, int64_t seq_len, X* x,
                      int64_t* y) {
  size_t s = std::upper_bound(shards.start.begin(), shards.start.end(), start) - shards.start.begin() - 1;
  for (int64_t done = 0; done < count; ++s) {
    const int64_t local = start + done - shards.start[s];
    const int64_t n = std::min(count - done, shards.start[s + 1] - shards.start[s] - local);
    const Src* src = static_cast<const Src*>(shards.base[s]) + local;
    const int64_t k = col + done;  // the row position of src[0]: x takes positions < T, y positions >= 1
    const int64_t x_end = std::min(n, seq_len - k);
    for (int64_t i = 0; i < x_end; ++i) x[k + i] = static_cast<X>(src[i]);
    for (int64_t i = (k == 0 ? 1 : 0); i < n; ++i) y[k + i - 1] = static_cast<int64_t>(src[i]);
    done += n;
  }
}

}  // namespace

void gather_run(const ShardTable& shards, int64_t start, int64_t count, int64_t col, int64_t seq_len, void* x,
                bool x_int32, int64_t* y) {
  if (count <= 0) return;
  if (shards.token_bytes == 2) {
    if (x_int32) return gather_run_typed<uint16_t, int32_t>(shards, start, count, col, seq_len, static_cast<int32_t*>(x), y);
    return gather_run_typed<uint16_t, int64_t>(shards, start, count, col, seq_len, static_cast<int64_t*>(x), y);
  }
  if (x_int32) return gather_run_typed<uint32_t, int32_t>(shards, start, count, col, seq_len, static_cast<int32_t*>(x), y);
  return gather_run_typed<uint32_t, int64_t>(shards, start, count, col, seq_len, static_cast<int64_t*>(x), y);
}

void copy_tokens(const ShardTable& shards, int64_t start, int64_t count, void* out) {
  if (count == 0) return;
  size_t s = std::upper_bound(shards.start.begin(), shards.start.end(), start) - shards.start.begin() - 1;
  auto* dst = static_cast<char*>(out);
  for (int64_t done = 0; done < count; ++s) {
    const int64_t local = start + done - shards.start[s];
    const int64_t n = std::min(count - done, shards.start[s + 1] - shards.start[s] - local);
    std::memcpy(dst + done * shards.token_bytes, static_cast<const char*>(shards.base[s]) + local * shards.token_bytes,
                static_cast<size_t>(n) * shards.token_bytes);
    done += n;
  }
}

void window_starts(Sampling mode, uint64_t seed, uint64_t step, int64_t row0, int64_t count,
                   int64_t global_batch, int64_t num_tokens, int64_t seq_len, const Chunking& chunking,
                   int64_t* starts) {
  for (int64_t b = 0; b < count; ++b)
    starts[b] = static_cast<int64_t>(window_start(mode, seed, step, static_cast<uint64_t>(row0 + b),
                                                  global_batch, num_tokens, seq_len, chunking));
}

void window_starts_of_rows(Sampling mode, uint64_t seed, uint64_t step, const int64_t* rows, int64_t count,
                           int64_t global_batch, int64_t num_tokens, int64_t seq_len, const Chunking& chunking,
                           int64_t* starts) {
  for (int64_t b = 0; b < count; ++b)
    starts[b] = static_cast<int64_t>(window_start(mode, seed, step, static_cast<uint64_t>(rows[b]), global_batch,
                                                  num_tokens, seq_len, chunking));
}

}  // namespace gpuload
