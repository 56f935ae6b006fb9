// Window starts as pure functions of (seed, step, global row): a line-for-line port of
// gpuload/sampling.py (its docstring holds the definitions). Unsigned 64-bit arithmetic wraps
// modulo 2^64, exactly like the int64 torch reference.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace gpuload {

constexpr uint64_t kSaltRandom = 0x243F6A8885A308D3ull;
constexpr uint64_t kSaltShuffle = 0x13198A2E03707344ull;
constexpr uint64_t kSaltChunks = 0xA4093822299F31D0ull;
constexpr uint64_t kSaltMixture = 0xBE5466CF34E90C6Cull;
constexpr uint64_t kSaltAlignedRandom = 0x452821E638D01377ull;
constexpr int kFeistelRounds = 6;

enum class Sampling : int { kRandom = 0, kShuffle = 1, kSequential = 2 };

inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline int bit_length(uint64_t v) { return v == 0 ? 0 : 64 - __builtin_clzll(v); }

// Half the Feistel domain width: the smallest h >= 1 with 4^h >= num_windows.
inline int feistel_half_bits(uint64_t num_windows) {
  int h = (bit_length(num_windows - 1) + 1) / 2;
  return h < 1 ? 1 : h;
}

// perm(seed, epoch)(index): cycle-walking Feistel bijection of [0, num_windows).
inline uint64_t feistel_permute(uint64_t index, uint64_t epoch, uint64_t seed, uint64_t num_windows) {
  const int half = feistel_half_bits(num_windows);
  const uint64_t mask = (uint64_t{1} << half) - 1;
  const uint64_t seed_key = mix64(seed ^ kSaltShuffle);
  uint64_t keys[kFeistelRounds];
  for (int r = 0; r < kFeistelRounds; ++r) keys[r] = mix64(epoch * kFeistelRounds + seed_key + r);
  uint64_t x = index;
  do {
    uint64_t left = x >> half, right = x & mask;
    for (int r = 0; r < kFeistelRounds; ++r) {
      const uint64_t next = left ^ (mix64(right ^ keys[r]) & mask);
      left = right;
      right = next;
    }
    x = (left << half) | right;
  } while (x >= num_windows);
  return x;
}

// The stream cut into chunks for a ring smaller than it (gpuload.sampling.Chunking);
// windows_per_chunk == 0 means the whole-stream rule.
struct Chunking {
  uint64_t windows_per_chunk = 0, num_windows = 0, num_chunks = 0, chunk_tokens = 0, last_windows = 0;
  uint64_t last_length = 0, steps_per_visit = 0;

  Chunking() = default;
  Chunking(uint64_t num_tokens, uint64_t seq_len, uint64_t global_batch, uint64_t wc)
      : windows_per_chunk(wc), num_windows((num_tokens - 1) / seq_len) {
    if (wc == 0) return;
    num_chunks = (num_windows + wc - 1) / wc;
    chunk_tokens = wc * seq_len;
    last_windows = num_windows - (num_chunks - 1) * wc;
    last_length = num_tokens - (num_chunks - 1) * chunk_tokens;
    steps_per_visit = wc / global_batch > 0 ? wc / global_batch : 1;
  }
  bool active() const { return windows_per_chunk != 0; }
};

// order(e, pos): the chunk at position pos of pass e; the (short) last chunk stays last.
inline uint64_t chunk_order(uint64_t seed, uint64_t epoch, uint64_t pos, uint64_t num_chunks) {
  if (pos == num_chunks - 1) return pos;
  return feistel_permute(pos, epoch, seed ^ kSaltChunks, num_chunks - 1);
}

// Start token of global row `row` at `step`; the caller guarantees num_tokens > seq_len >= 1.
inline uint64_t window_start(Sampling mode, uint64_t seed, uint64_t step, uint64_t row,
                             uint64_t global_batch, uint64_t num_tokens, uint64_t seq_len,
                             const Chunking& c = Chunking()) {
  if (mode == Sampling::kRandom) {
    const uint64_t h = mix64(mix64(mix64(seed ^ kSaltRandom) + step) + row);
    if (!c.active()) return (h >> 1) % (num_tokens - seq_len);
    const uint64_t visit = step / c.steps_per_visit;
    const uint64_t chunk = chunk_order(seed, visit / c.num_chunks, visit % c.num_chunks, c.num_chunks);
    const uint64_t valid = chunk == c.num_chunks - 1 ? c.last_length - seq_len : c.chunk_tokens + 1 - seq_len;
    return chunk * c.chunk_tokens + (h >> 1) % valid;
  }
  const uint64_t num_windows = (num_tokens - 1) / seq_len;
  const uint64_t w = step * global_batch + row;
  if (mode == Sampling::kSequential) return (w % num_windows) * seq_len;
  if (!c.active()) return feistel_permute(w % num_windows, w / num_windows, seed, num_windows) * seq_len;
  const uint64_t epoch = w / num_windows, index = w % num_windows;
  const uint64_t pos = index / c.windows_per_chunk;
  const uint64_t chunk = chunk_order(seed, epoch, pos, c.num_chunks);
  const uint64_t windows = chunk == c.num_chunks - 1 ? c.last_windows : c.windows_per_chunk;
  const uint64_t within = feistel_permute(index - pos * c.windows_per_chunk, epoch * c.num_chunks + pos, seed, windows);
  return (chunk * c.windows_per_chunk + within) * seq_len;
}

// align='bos' (gpuload/documents.py): where global row `row` of `step` reads in the usable document
// starts U (D of them). Without a pass table, the whole-stream rule; with one, the chunked rule: the
// table is documents.AlignedChunking.pass_table(seed, pass0), 4 rows of `len` int64 values (cum, P_j,
// D_j, Feistel half width by position over passes pass0 and pass0 + 1), and pos0 the position of the
// step's first row, from which each row scans forward to its own (the Triton kernel does the same).
struct AlignedTable {
  const int64_t* data = nullptr;
  int64_t len = 0;
  uint64_t pass0 = 0, num_visited = 0;
  int64_t pos0 = 0;
};

inline uint64_t aligned_start_index(Sampling mode, uint64_t seed, uint64_t step, uint64_t row, uint64_t global_batch,
                                    uint64_t num_starts, const AlignedTable& t = AlignedTable()) {
  const uint64_t w = step * global_batch + row;
  if (mode == Sampling::kSequential) return w % num_starts;  // a table of the epoch's row starts, in order
  const uint64_t h = mix64(mix64(mix64(seed ^ kSaltAlignedRandom) + step) + row);
  if (t.data == nullptr) {
    if (mode == Sampling::kRandom) return (h >> 1) % num_starts;
    return feistel_permute(w % num_starts, w / num_starts, seed, num_starts);
  }
  const uint64_t lin = w - t.pass0 * num_starts;
  int64_t pos = t.pos0;
  while (static_cast<uint64_t>(t.data[pos + 1]) <= lin) ++pos;
  const uint64_t first = t.data[t.len + pos], count = t.data[2 * t.len + pos];
  if (mode == Sampling::kRandom) return first + (h >> 1) % count;
  const uint64_t visit = t.pass0 * t.num_visited + static_cast<uint64_t>(pos);
  return first + feistel_permute(lin - static_cast<uint64_t>(t.data[pos]), visit, seed, count);
}

// Mixture slots (gpuload/mixture.py): slots[b] is the rank of row0 + b's hash mix64(key + g) among
// the hashes of all rows_total rows of the step, key = mix64(mix64(seed ^ kSaltMixture) + step).
// mix64 is a bijection, so the hashes are distinct and the ranks a permutation of [0, rows_total).
inline void mixture_slots(uint64_t seed, uint64_t step, int64_t rows_total, int64_t row0, int64_t count,
                          int64_t* slots) {
  const uint64_t key = mix64(mix64(seed ^ kSaltMixture) + step);
  std::vector<uint64_t> sorted(static_cast<size_t>(rows_total));
  for (int64_t g = 0; g < rows_total; ++g) sorted[g] = mix64(key + static_cast<uint64_t>(g));
  std::sort(sorted.begin(), sorted.end());
  for (int64_t b = 0; b < count; ++b) {
    const uint64_t own = mix64(key + static_cast<uint64_t>(row0 + b));
    slots[b] = std::lower_bound(sorted.begin(), sorted.end(), own) - sorted.begin();
  }
}

}  // namespace gpuload
