#include "packing.h"

#include <algorithm>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>

#include "sampling.h"

namespace gpuload {
namespace {

// perm(seed, epoch)(i) over [0, count), gpuload.packing._permutation (a count of 1 maps 0 to 0).
uint64_t permute(uint64_t i, uint64_t count, uint64_t epoch, uint64_t seed) {
  return count == 1 ? 0 : feistel_permute(i, epoch, seed, count);
}

}  // namespace

BestFitPlanner::BestFitPlanner(std::vector<int64_t> doc_starts, int64_t num_tokens, int64_t seq_len, uint64_t seed,
                               int64_t group_docs, bool remainder)
    : starts_(std::move(doc_starts)), row_tokens_(seq_len + 1), group_docs_(group_docs), seed_(seed),
      remainder_(remainder) {
  if (starts_.empty()) throw std::invalid_argument("best-fit packing needs documents: the stream holds no BOS");
  if (group_docs < 1 || seq_len < 1) throw std::invalid_argument("need group_docs >= 1 and seq_len >= 1");
  num_docs_ = static_cast<int64_t>(starts_.size());
  lengths_.resize(starts_.size());
  for (int64_t d = 0; d < num_docs_; ++d) lengths_[d] = (d + 1 < num_docs_ ? starts_[d + 1] : num_tokens) - starts_[d];
  num_groups_ = (num_docs_ + group_docs - 1) / group_docs;
  // Once, on every core (the caller holds no lock we need): the documents in dealing order, so that group j
  // is the contiguous stretch [j*K, (j+1)*K) of them, then each group packed to count its rows.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), num_groups_));
  const auto on_all_cores = [threads](int64_t n, const auto& work) {  // work(begin, end, thread)
    std::vector<std::thread> pool;
    for (int64_t t = 0; t < threads; ++t)
      pool.emplace_back([&, t] { work(n * t / threads, n * (t + 1) / threads, t); });
    for (auto& thread : pool) thread.join();
  };
  std::vector<int64_t> dealt_starts(num_docs_), dealt_lengths(num_docs_);
  on_all_cores(num_docs_, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t doc = permute(i, num_docs_, 0, seed_ ^ kSaltPackGroups);
      dealt_starts[i] = starts_[doc];
      dealt_lengths[i] = lengths_[doc];
    }
  });
  starts_.swap(dealt_starts);
  lengths_.swap(dealt_lengths);
  group_rows_.assign(num_groups_, 0);
  std::vector<int64_t> most(threads, 1);
  on_all_cores(num_groups_, [&](int64_t begin, int64_t end, int64_t t) {
    Scratch scratch;
    for (int64_t j = begin; j < end; ++j) {
      const auto rows = pack(j, 0, scratch);
      group_rows_[j] = static_cast<int64_t>(rows.size());
      for (const auto& r : rows) most[t] = std::max(most[t], static_cast<int64_t>(r.size()));
    }
  });
  for (int64_t j = 0; j < num_groups_; ++j) epoch_rows_ += group_rows_[j];
  max_pieces_ = *std::max_element(most.begin(), most.end());
  if (epoch_rows_ == 0)
    throw std::invalid_argument("best-fit packing: no group of " + std::to_string(group_docs) +
                                " documents fills a row of " + std::to_string(row_tokens_) +
                                " tokens; use a smaller seq_len or more data");
}

std::vector<int64_t> BestFitPlanner::document_starts() const {
  std::vector<int64_t> starts = starts_;
  std::sort(starts.begin(), starts.end());
  return starts;
}

std::vector<std::vector<PackedPiece>> BestFitPlanner::pack(int64_t group, uint64_t epoch, Scratch& w) const {
  const int64_t first = group * group_docs_;
  const int64_t count = std::min(group_docs_, num_docs_ - first);
  const uint64_t order_key = epoch * static_cast<uint64_t>(num_groups_) + static_cast<uint64_t>(group);
  // Pieces that fit a row whole sit in a bucket per length, in rank order (documents by their rank in this
  // epoch's order, then tails as they are made), with a bit per non-empty bucket; longer ones in a set by
  // (length, rank). The longest that fits is the highest set bit at or below the space, the earliest of it.
  const int64_t R = row_tokens_;
  w.buckets.resize(R + 1);
  w.heads.assign(R + 1, 0);
  for (auto& bucket : w.buckets) bucket.clear();
  w.bits.assign(R / 64 + 1, 0);
  std::set<std::tuple<int64_t, int64_t, int64_t, bool>> longs;
  int64_t pieces = 0, next_rank = 0;
  const auto insert = [&](int64_t length, int64_t start, bool bos) {
    if (length <= R) {
      w.buckets[length].push_back({start, length, bos});
      w.bits[length / 64] |= uint64_t{1} << (length % 64);
    } else {
      longs.emplace(length, next_rank, start, bos);
    }
    ++next_rank;
    ++pieces;
  };
  const auto take = [&](int64_t length) {
    const PackedPiece piece = w.buckets[length][w.heads[length]++];
    if (w.heads[length] == static_cast<int64_t>(w.buckets[length].size()))
      w.bits[length / 64] &= ~(uint64_t{1} << (length % 64));
    --pieces;
    return piece;
  };
  // The highest non-empty bucket at or below `limit`, or 0.
  const auto highest = [&](int64_t limit) -> int64_t {
    for (int64_t word = limit / 64; word >= 0; --word) {
      uint64_t bits = w.bits[word];
      if (word == limit / 64) bits &= (limit % 64 == 63) ? ~uint64_t{0} : ((uint64_t{1} << (limit % 64 + 1)) - 1);
      if (bits) return word * 64 + 63 - __builtin_clzll(bits);
    }
    return 0;
  };
  const auto lowest = [&]() -> int64_t {
    for (size_t word = 0; word < w.bits.size(); ++word)
      if (w.bits[word]) return static_cast<int64_t>(word) * 64 + __builtin_ctzll(w.bits[word]);
    return 0;
  };
  for (int64_t rank = 0; rank < count; ++rank) {
    const int64_t doc = first + static_cast<int64_t>(permute(rank, count, order_key, seed_ ^ kSaltPackOrder));
    insert(lengths_[doc], starts_[doc], false);
  }
  std::vector<std::vector<PackedPiece>> rows;
  while (pieces > 0) {
    std::vector<PackedPiece> row;
    int64_t space = R;
    while (space > 0 && pieces > 0) {
      const int64_t fit = highest(space);
      if (fit > 0) {
        row.push_back(take(fit));
        space -= fit;
        continue;
      }
      // Nothing fits: crop the shortest to fill the row (every bucket is longer than the space, every long
      // piece longer than every bucket).
      PackedPiece piece;
      const int64_t shortest = lowest();
      if (shortest > 0) {
        piece = take(shortest);
      } else {
        const auto [length, rank, start, bos] = *longs.begin();
        longs.erase(longs.begin());
        --pieces;
        piece = {start, length, bos};
      }
      row.push_back({piece.start, space, piece.bos});
      if (remainder_) insert(piece.length - space + 1, piece.start + space - (piece.bos ? 1 : 0), true);
      space = 0;
    }
    if (space == 0) rows.push_back(std::move(row));
  }
  return rows;
}

const std::vector<PackedPiece>& BestFitPlanner::row(uint64_t step, uint64_t g, uint64_t global_batch, bool random) {
  const uint64_t w = step * global_batch + g;
  const uint64_t epoch = w / static_cast<uint64_t>(epoch_rows_);
  const int64_t i = static_cast<int64_t>(w % static_cast<uint64_t>(epoch_rows_));
  if (epoch != order_epoch_) {
    order_.resize(num_groups_);
    begins_.resize(num_groups_);
    int64_t begin = 0;
    for (int64_t q = 0; q < num_groups_; ++q) {
      order_[q] = static_cast<int64_t>(permute(q, num_groups_, epoch + 1, seed_ ^ kSaltPackGroups));
      begins_[q] = begin;
      begin += group_rows_[order_[q]];
    }
    order_epoch_ = epoch;
  }
  int64_t at = std::upper_bound(begins_.begin(), begins_.end(), i) - begins_.begin() - 1;
  while (group_rows_[order_[at]] == 0) ++at;  // a group that fills no row begins where the next one does
  const int64_t group = order_[at];
  const uint64_t rows = static_cast<uint64_t>(group_rows_[group]);
  uint64_t r = static_cast<uint64_t>(i - begins_[at]);
  if (random) {
    r = (mix64(mix64(mix64(seed_ ^ kSaltPackRandom) + step) + g) >> 1) % rows;
  } else {
    r = permute(r, rows, epoch * static_cast<uint64_t>(num_groups_) + static_cast<uint64_t>(group), seed_);
  }
  if (group != packed_group_ || epoch != packed_epoch_) {
    packed_ = pack(group, epoch);
    packed_group_ = group;
    packed_epoch_ = epoch;
  }
  return packed_[r];
}

void BestFitPlanner::positions(uint64_t step, uint64_t row0, int64_t count, uint64_t global_batch, bool random,
                               int64_t* out) {
  for (int64_t b = 0; b < count; ++b) {
    int64_t* row = out + b * row_tokens_;
    int64_t col = 0;
    for (const PackedPiece& p : this->row(step, row0 + b, global_batch, random)) {
      int64_t k = col;
      if (p.bos) row[k++] = -1;
      for (int64_t src = p.start; k < col + p.length; ++k, ++src) row[k] = src;
      col += p.length;
    }
  }
}

void gather_packed(const ShardTable& shards, BestFitPlanner& planner, uint64_t step, uint64_t row0, int64_t count,
                   uint64_t global_batch, bool random, int64_t seq_len, void* x, bool x_int32, int64_t* y, int64_t bos) {
  const size_t x_bytes = x_int32 ? 4 : 8;
  for (int64_t b = 0; b < count; ++b) {
    void* row_x = static_cast<char*>(x) + b * seq_len * x_bytes;
    int64_t* row_y = y + b * seq_len;
    int64_t col = 0;
    for (const PackedPiece& piece : planner.row(step, row0 + b, global_batch, random)) {
      int64_t k = col;
      if (piece.bos) {  // a BOS the stream does not hold here
        if (k < seq_len) {
          if (x_int32) static_cast<int32_t*>(row_x)[k] = static_cast<int32_t>(bos);
          else static_cast<int64_t*>(row_x)[k] = bos;
        }
        if (k > 0) row_y[k - 1] = bos;
        ++k;
      }
      gather_run(shards, piece.start, col + piece.length - k, k, seq_len, row_x, x_int32, row_y);
      col += piece.length;
    }
  }
}

}  // namespace gpuload
