// CPU gather: windows of T+1 tokens from the memory-mapped shards into x (B, T) and y (B, T).
#pragma once

#include <cstdint>
#include <vector>

#include "sampling.h"

namespace gpuload {

// The shards of one token stream: raw pointers to memory the caller keeps mapped.
struct ShardTable {
  std::vector<const void*> base;   // first token of each shard
  std::vector<int64_t> start;      // global position of each shard's first token; back() = N
  int token_bytes = 2;             // 2 (uint16) or 4 (uint32)
  int64_t num_tokens() const { return start.back(); }
};

// Row out_rows[b] (b without out_rows) of x/y gets the window starting at starts[b], b in [0, batch);
// x is int32 or int64, y int64. The caller guarantees 0 <= starts[b], starts[b] + seq_len < num_tokens,
// and out_rows[b] inside x and y.
void gather_windows(const ShardTable& shards, const int64_t* starts, int64_t batch, int64_t seq_len,
                    void* x, bool x_int32, int64_t* y, const int64_t* out_rows = nullptr);

// Tokens [start, start + count) of the stream into `out` (count tokens of the shards' width); the caller
// guarantees the range lies inside the stream.
void copy_tokens(const ShardTable& shards, int64_t start, int64_t count, void* out);

// One run of `count` consecutive stream tokens from `start` into row positions [col, col + count) of the row
// whose x and y are given (x gets positions < seq_len, y positions >= 1, shifted by one).
void gather_run(const ShardTable& shards, int64_t start, int64_t count, int64_t col, int64_t seq_len, void* x,
                bool x_int32, int64_t* y);

// starts[b] = window_start(mode, seed, step, row0 + b, ..., chunking) for b in [0, count).
void window_starts(Sampling mode, uint64_t seed, uint64_t step, int64_t row0, int64_t count,
                   int64_t global_batch, int64_t num_tokens, int64_t seq_len, const Chunking& chunking,
                   int64_t* starts);

// starts[b] = window_start(mode, seed, step, rows[b], ..., chunking) for b in [0, count).
void window_starts_of_rows(Sampling mode, uint64_t seed, uint64_t step, const int64_t* rows, int64_t count,
                           int64_t global_batch, int64_t num_tokens, int64_t seq_len, const Chunking& chunking,
                           int64_t* starts);

}  // namespace gpuload
