#include "packing.h"

#include <algorithm>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
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
  for (int64_t j = 0; j < num_groups_; ++j) {
    const auto rows = pack(j, 0);
    group_rows_.push_back(static_cast<int64_t>(rows.size()));
    epoch_rows_ += static_cast<int64_t>(rows.size());
    for (const auto& r : rows) max_pieces_ = std::max(max_pieces_, static_cast<int64_t>(r.size()));
  }
  if (epoch_rows_ == 0)
    throw std::invalid_argument("best-fit packing: no group of " + std::to_string(group_docs) +
                                " documents fills a row of " + std::to_string(row_tokens_) +
                                " tokens; use a smaller seq_len or more data");
}

std::vector<std::vector<PackedPiece>> BestFitPlanner::pack(int64_t group, uint64_t epoch) const {
  const int64_t first = group * group_docs_;
  const int64_t count = std::min(group_docs_, num_docs_ - first);
  const uint64_t order_key = epoch * static_cast<uint64_t>(num_groups_) + static_cast<uint64_t>(group);
  // (length, rank, start, bos): the longest that fits is the first of its length at or below the space.
  using Entry = std::tuple<int64_t, int64_t, int64_t, bool>;
  std::set<Entry> pool;
  for (int64_t rank = 0; rank < count; ++rank) {
    const uint64_t k = permute(rank, count, order_key, seed_ ^ kSaltPackOrder);
    const uint64_t doc = permute(first + k, num_docs_, 0, seed_ ^ kSaltPackGroups);
    pool.emplace(lengths_[doc], rank, starts_[doc], false);
  }
  std::vector<std::vector<PackedPiece>> rows;
  int64_t next_rank = count;
  while (!pool.empty()) {
    std::vector<PackedPiece> row;
    int64_t space = row_tokens_;
    while (space > 0 && !pool.empty()) {
      auto fit = pool.upper_bound(Entry{space, std::numeric_limits<int64_t>::max(), 0, false});
      if (fit != pool.begin()) {
        const int64_t length = std::get<0>(*std::prev(fit));
        fit = pool.lower_bound(Entry{length, std::numeric_limits<int64_t>::min(), 0, false});
        const auto [len, rank, start, bos] = *fit;
        pool.erase(fit);
        row.push_back({start, len, bos});
        space -= len;
        continue;
      }
      const auto [len, rank, start, bos] = *pool.begin();  // nothing fits: crop the shortest to fill the row
      pool.erase(pool.begin());
      row.push_back({start, space, bos});
      if (remainder_) pool.emplace(len - space + 1, next_rank++, start + space - (bos ? 1 : 0), true);
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

}  // namespace gpuload
