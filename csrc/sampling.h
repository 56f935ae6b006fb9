// Window starts as pure functions of (seed, step, global row): a line-for-line port of
// gpuload/sampling.py (its docstring holds the definitions). Unsigned 64-bit arithmetic wraps
// modulo 2^64, exactly like the int64 torch reference.
#pragma once

#include <cstdint>

namespace gpuload {

constexpr uint64_t kSaltRandom = 0x243F6A8885A308D3ull;
constexpr uint64_t kSaltShuffle = 0x13198A2E03707344ull;
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

// Start token of global row `row` at `step`; the caller guarantees num_tokens > seq_len >= 1.
inline uint64_t window_start(Sampling mode, uint64_t seed, uint64_t step, uint64_t row,
                             uint64_t global_batch, uint64_t num_tokens, uint64_t seq_len) {
  if (mode == Sampling::kRandom) {
    const uint64_t h = mix64(mix64(mix64(seed ^ kSaltRandom) + step) + row);
    return (h >> 1) % (num_tokens - seq_len);
  }
  const uint64_t num_windows = (num_tokens - 1) / seq_len;
  const uint64_t w = step * global_batch + row;
  if (mode == Sampling::kSequential) return (w % num_windows) * seq_len;
  return feistel_permute(w % num_windows, w / num_windows, seed, num_windows) * seq_len;
}

}  // namespace gpuload
