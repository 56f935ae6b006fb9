// Best-fit packing of whole documents into rows: a line-for-line port of gpuload/packing.py (its docstring
// holds the rule), so the planner costs C++ time per step; tests hold it to the Python reference.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "gather.h"

namespace gpuload {

constexpr uint64_t kSaltPackGroups = 0x082EFA98EC4E6C89ull;
constexpr uint64_t kSaltPackOrder = 0x3F84D5B5B5470917ull;
constexpr uint64_t kSaltPackRandom = 0x0801F2E2858EFC16ull;

struct PackedPiece {
  int64_t start, length;
  bool bos;  // the first token is a BOS the stream does not hold there (a cropped tail put back)
};

class BestFitPlanner {
 public:
  BestFitPlanner(std::vector<int64_t> doc_starts, int64_t num_tokens, int64_t seq_len, uint64_t seed,
                 int64_t group_docs, bool remainder);

  // Row g's pieces at `step` (global batch G), as gpuload.packing.BestFitPacking.row.
  const std::vector<PackedPiece>& row(uint64_t step, uint64_t g, uint64_t global_batch, bool random);
  // Rows row0 .. row0+count-1 as stream positions, count x (seq_len + 1), -1 for a BOS not in the stream.
  void positions(uint64_t step, uint64_t row0, int64_t count, uint64_t global_batch, bool random, int64_t* out);
  // Group `group`'s rows in packing order at `epoch`.
  std::vector<std::vector<PackedPiece>> pack(int64_t group, uint64_t epoch) const { return pack(group, epoch, scratch_); }

  // The documents' starts, sorted as they were given (they are held in dealing order).
  std::vector<int64_t> document_starts() const;

  int64_t num_groups() const { return num_groups_; }
  int64_t epoch_rows() const { return epoch_rows_; }
  int64_t max_pieces() const { return max_pieces_; }
  const std::vector<int64_t>& group_rows() const { return group_rows_; }

 private:
  // pack()'s buckets, kept between calls so that a pack allocates no bucket once they have grown.
  struct Scratch {
    std::vector<std::vector<PackedPiece>> buckets;
    std::vector<int64_t> heads;
    std::vector<uint64_t> bits;
  };
  mutable Scratch scratch_;
  std::vector<std::vector<PackedPiece>> pack(int64_t group, uint64_t epoch, Scratch& w) const;
  std::vector<int64_t> starts_, lengths_;  // the documents in dealing order (after construction)
  int64_t row_tokens_, group_docs_, num_docs_, num_groups_, epoch_rows_ = 0, max_pieces_ = 1;
  uint64_t seed_;
  bool remainder_;
  std::vector<int64_t> group_rows_;
  // The epoch whose group order is at hand: order and the epoch row where each group begins.
  uint64_t order_epoch_ = ~uint64_t{0};
  std::vector<int64_t> order_, begins_;
  // The last group packed (the rows of a step come from one or two groups, in turn).
  int64_t packed_group_ = -1;
  uint64_t packed_epoch_ = 0;
  std::vector<std::vector<PackedPiece>> packed_;
};

// Packed rows row0 .. row0+count-1 of `step`, planned by `planner`, into contiguous (count, seq_len) x (int32 or
// int64) and y: each piece's run of the stream copied as the window gather copies a row, a piece's synthetic
// BOS written as `bos`.
void gather_packed(const ShardTable& shards, BestFitPlanner& planner, uint64_t step, uint64_t row0, int64_t count,
                   uint64_t global_batch, bool random, int64_t seq_len, void* x, bool x_int32, int64_t* y, int64_t bos);

}  // namespace gpuload
