// Shard watch: the native gather reads the memory-mapped shards in place at every step, so a shard
// changed under a run (truncated: zeros in its last page; rewritten in place: new tokens) would reach
// batches silently. A background thread stats every shard by name and compares it with what was
// recorded when the loader opened it; the gather calls before_read/after_read around each read, and
// never returns more than `max_unverified` batches read since the start of the last clean pass.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace gpuload {

// What identifies a shard file when it was opened (st_dev, st_ino) and what must not change (size, mtime);
// fd >= 0: a descriptor of the opened file (owned by the caller), compared with fstat, which follows the
// opened inode even once another file is renamed over its name; fd < 0: compared by name.
struct FileIdentity {
  uint64_t device = 0, inode = 0;
  int64_t size = 0, mtime_ns = 0;
  int fd = -1;
};

// A shard changed after it was opened; what() names the file, the change and the first step it may affect.
struct ShardChanged : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class ShardWatch {
 public:
  // paths: as the OS takes them (absolute); names: for messages. The thread starts on the first read.
  ShardWatch(std::vector<std::string> paths, std::vector<std::string> names, std::vector<FileIdentity> identities,
             int64_t max_unverified, double interval_s);
  ~ShardWatch();
  ShardWatch(const ShardWatch&) = delete;
  ShardWatch& operator=(const ShardWatch&) = delete;

  // Call with the GIL held, before releasing it for the read: a forked child gets a fresh state here
  // (the parent's thread does not exist in it, and the parent's mutex may have been held at the fork).
  void enter();
  // Throws ShardChanged once a change is found; waits while max_unverified reads are unverified.
  void before_read(int64_t step);
  // Ends the read begun by before_read; a completed one counts (a pass that starts after this covers it).
  void after_read(int64_t step, bool completed);
  // One pass now, on this thread: "" or the change found (for `check()` and tests).
  std::string check_now() const;
  // The same for shards [first, end) only.
  std::string check_range(size_t first, size_t end) const;

  int64_t max_unverified() const { return max_unverified_; }
  double interval_s() const { return interval_s_; }

 private:
  struct State;
  void run(State* s);
  std::string describe(const State& s, int64_t requested_step) const;

  std::vector<std::string> paths_, names_;
  std::vector<FileIdentity> identities_;
  int64_t max_unverified_;
  double interval_s_;
  State* state_;  // leaked, not freed, in a forked child: its thread and lock belong to the parent
};

}  // namespace gpuload
