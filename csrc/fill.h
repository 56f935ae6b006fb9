// Bulk fill: tokens [start, start+count) of the shard stream into caller memory (the pinned ring),
// by pread() on file descriptors opened once. pread, not the memmap: a shard truncated under a
// memmap turns the next read into SIGBUS and kills the process; pread returns a short count we report.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace gpuload {

// An I/O failure on a shard; the bindings raise it as OSError (with errno when there is one).
class ShardReadError : public std::runtime_error {
 public:
  ShardReadError(const std::string& what, int err) : std::runtime_error(what), err_(err) {}
  int err() const { return err_; }  // errno, or 0 for a short read / EOF

 private:
  int err_;
};

// Copies are split into requests of this many bytes, taken by the threads in order. 4 MiB sits on the
// plateau of one-thread pread from the page cache (64 KiB: 8.1 GB/s, 256 KiB: 9.9, >= 1 MiB: ~11 on the
// dev VM) and still cuts a 256 MiB ring chunk into 64 requests, enough to balance 8 threads.
// bench_fill.py --sweep measures it.
constexpr int64_t kDefaultRequestBytes = int64_t{4} << 20;

class ShardFiles {
 public:
  // offsets[i] = byte offset of shard i's first token in paths[i]; counts[i] = its tokens.
  // Opens every file (O_RDONLY | O_CLOEXEC) and checks it still holds the tokens it should.
  // advise: posix_fadvise SEQUENTIAL on open and WILLNEED on each range filled. Off by default: on the
  // dev VM's virtio disk cold 256 MiB fills fell from 3.0 to 1.2-2.0 GB/s with it, and cached ones gained
  // nothing (bench_fill.py [--cold], row native-auto-advise). Worth re-measuring on NVMe.
  ShardFiles(const std::vector<std::string>& paths, const std::vector<int64_t>& offsets,
             const std::vector<int64_t>& counts, int token_bytes, int64_t request_bytes = kDefaultRequestBytes,
             bool advise = false);
  ~ShardFiles();
  ShardFiles(const ShardFiles&) = delete;
  ShardFiles& operator=(const ShardFiles&) = delete;

  // Tokens [start, start+count) into dst (count * token_bytes bytes, owned by the caller).
  // threads = 0 picks by size and the CPUs we may run on. Throws std::out_of_range for a range
  // outside the stream, ShardReadError when a file is shorter than it was or the read fails.
  void fill(void* dst, int64_t start, int64_t count, int threads = 0);
  // Closes the files; waits for fills in flight. Idempotent; fill() afterwards throws.
  void close();

  int64_t num_tokens() const { return start_.back(); }
  int token_bytes() const { return token_bytes_; }
  int64_t request_bytes() const { return request_bytes_; }
  bool advise() const { return advise_; }
  size_t num_files() const { return paths_.size(); }
  bool closed() const { return closed_; }
  // The thread count fill(threads=0) uses for `count` tokens.
  int auto_threads(int64_t count) const;

 private:
  struct Request {  // one pread: `bytes` bytes of file `file` at `offset` into dst + `dst_offset`
    int file;
    int64_t offset, bytes, dst_offset;
  };
  void read_request(const Request& r, char* dst) const;
  void close_fds();

  std::vector<std::string> paths_;
  std::vector<int> fds_;
  std::vector<int64_t> offset_;  // byte offset of each shard's first token
  std::vector<int64_t> start_;   // global position of each shard's first token; back() = N
  int token_bytes_;
  int64_t request_bytes_;
  bool advise_;
  std::atomic<bool> closed_{false};
  // fill() holds it shared, close() exclusive: a close from another thread never pulls an fd
  // (which the OS could hand to an unrelated open) out from under a read in flight.
  mutable std::shared_mutex lock_;
};

}  // namespace gpuload
