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

// Rows [0, batch) of x/y get the windows starting at starts[b]; x is int32 or int64, y int64.
// The caller guarantees 0 <= starts[b] and starts[b] + seq_len < num_tokens.
void gather_windows(const ShardTable& shards, const int64_t* starts, int64_t batch, int64_t seq_len,
                    void* x, bool x_int32, int64_t* y);

// starts[b] = window_start(mode, seed, step, row0 + b, ..., chunking) for b in [0, count).
void window_starts(Sampling mode, uint64_t seed, uint64_t step, int64_t row0, int64_t count,
                   int64_t global_batch, int64_t num_tokens, int64_t seq_len, const Chunking& chunking,
                   int64_t* starts);

}  // namespace gpuload
