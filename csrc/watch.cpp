#include "watch.h"

#include <pthread.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>

namespace gpuload {
namespace {

// Bumped in a forked child: a state made in another generation belongs to the parent (a getpid() per
// step would be a system call on every batch).
std::atomic<uint64_t> fork_generation{0};
[[maybe_unused]] const int atfork_registered = pthread_atfork(nullptr, nullptr, [] { fork_generation.fetch_add(1); });

}  // namespace

struct ShardWatch::State {
  std::mutex mutex;
  std::condition_variable wake_watcher, wake_reader;
  uint64_t generation = fork_generation.load();
  std::thread thread;
  bool started = false, stop = false, pass_wanted = false;
  uint64_t reads = 0;     // reads completed
  uint64_t in_flight = 0;  // reads between before_read and after_read
  int waiting = 0;         // readers waiting on wake_reader
  uint64_t verified = 0;  // the first `verified` reads saw unchanged shards (a clean pass began after them)
  std::vector<int64_t> steps;  // step of read r at r % steps.size(): the first unverified read is in it
  std::string change;          // non-empty once a pass found a change
  uint64_t first_unverified = 0;  // `verified` when the change was found
};

namespace {

// "" when the shard is still what was opened; else how it changed. By descriptor: exact. By name: a name
// that now holds another file (or none) counts as unchanged, since the map holds the original pages (a change
// made to those pages before the rename goes unseen: README, "Faults").
std::string compare(const std::string& path, const FileIdentity& id) {
  struct stat st;
  if (id.fd >= 0) {
    if (fstat(id.fd, &st) != 0) return "";
  } else if (stat(path.c_str(), &st) != 0 || static_cast<uint64_t>(st.st_dev) != id.device ||
             static_cast<uint64_t>(st.st_ino) != id.inode) {
    return "";
  }
  const int64_t mtime = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  std::string what;
  if (st.st_size != id.size)
    what = std::string(st.st_size < id.size ? "truncated" : "grown") + " from " + std::to_string(id.size) + " to " +
           std::to_string(st.st_size) + " bytes";
  if (mtime != id.mtime_ns) what += std::string(what.empty() ? "" : ", ") + "modified (its mtime changed)";
  return what;
}

}  // namespace

ShardWatch::ShardWatch(std::vector<std::string> paths, std::vector<std::string> names,
                       std::vector<FileIdentity> identities, int64_t max_unverified, double interval_s)
    : paths_(std::move(paths)), names_(std::move(names)), identities_(std::move(identities)),
      max_unverified_(max_unverified), interval_s_(interval_s), state_(new State) {
  if (paths_.size() != identities_.size() || names_.size() != paths_.size())
    throw std::invalid_argument("ShardWatch: one path, name and identity per shard");
  if (max_unverified_ < 1 || max_unverified_ > (int64_t{1} << 24) || !(interval_s_ > 0) || interval_s_ > 3600)
    throw std::invalid_argument("ShardWatch: need 1 <= max_unverified <= 2**24 and 0 < interval_s <= 3600");
  state_->steps.assign(static_cast<size_t>(max_unverified_) + 1, 0);
}

ShardWatch::~ShardWatch() {
  if (state_->generation != fork_generation.load()) return;  // a forked child: the parent's state, leaked
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->stop = true;
  }
  state_->wake_watcher.notify_all();
  state_->wake_reader.notify_all();
  if (state_->thread.joinable()) state_->thread.join();
  delete state_;
}

void ShardWatch::enter() {
  if (state_->generation == fork_generation.load(std::memory_order_relaxed)) return;
  auto* fresh = new State;
  fresh->steps.assign(static_cast<size_t>(max_unverified_) + 1, 0);
  state_ = fresh;
}

std::string ShardWatch::check_now() const { return check_range(0, paths_.size()); }

std::string ShardWatch::check_range(size_t first, size_t end) const {
  for (size_t i = first; i < end && i < paths_.size(); ++i) {
    const std::string what = compare(paths_[i], identities_[i]);
    if (!what.empty()) return names_[i] + ": " + what;
  }
  return "";
}

void ShardWatch::run(State* s) {
  using Clock = std::chrono::steady_clock;
  std::unique_lock<std::mutex> lock(s->mutex);
  auto interval = std::chrono::duration<double>(interval_s_);
  while (!s->stop) {
    s->wake_watcher.wait_for(lock, interval, [s] { return s->stop || s->pass_wanted; });
    if (s->stop) return;
    s->pass_wanted = false;
    const uint64_t pass_start = s->reads;
    if (pass_start == s->verified) continue;  // nothing read since the last pass: nothing to prove
    lock.unlock();
    const auto began = Clock::now();
    const std::string change = check_now();
    // Timed passes take at most ~5% of a core (10,000 shards: ~10 ms a pass, one per 0.2 s); the reads'
    // bound still asks for a pass whenever max_unverified / 2 batches went by.
    interval = std::max(std::chrono::duration<double>(interval_s_),
                        std::chrono::duration<double>(20 * (Clock::now() - began)));
    lock.lock();
    if (!change.empty()) {
      s->change = change;
      s->first_unverified = s->verified;
      s->wake_reader.notify_all();
      return;
    }
    s->verified = pass_start;
    s->wake_reader.notify_all();
  }
}

std::string ShardWatch::describe(const State& s, int64_t requested_step) const {
  // Reads before first_unverified were proven clean; the change came after the stat that proved them.
  const bool read_since = s.first_unverified < s.reads;
  const int64_t step = read_since ? s.steps[s.first_unverified % s.steps.size()] : requested_step;
  return s.change + " after the loader opened it. gpuload reads a shard as it was when the loader opened it, and "
         "this one no longer is: " +
         (read_since ? "batches from step " + std::to_string(step) + " on may hold changed tokens"
                     : "no batch has read it since the change; step " + std::to_string(step) + " would have") +
         ". This loader stays stopped: restore the shard, then resume a new loader (a new run) from a checkpoint at "
         "or before step " + std::to_string(step) + ", or create one on the new content.";
}

void ShardWatch::before_read(int64_t step) {
  State* s = state_;
  std::unique_lock<std::mutex> lock(s->mutex);
  if (!s->started) {
    s->thread = std::thread([this, s] { run(s); });  // may throw (no thread to be had): then retried next read
    s->started = true;
  }
  const auto bound = static_cast<uint64_t>(max_unverified_);
  if (s->change.empty() && s->reads + s->in_flight - s->verified >= bound) {
    s->pass_wanted = true;
    s->wake_watcher.notify_one();
    ++s->waiting;
    s->wake_reader.wait(lock, [s, bound] {
      return s->stop || !s->change.empty() || s->reads + s->in_flight - s->verified < bound;
    });
    --s->waiting;
  }
  if (!s->change.empty()) throw ShardChanged(describe(*s, step));
  ++s->in_flight;
}

void ShardWatch::after_read(int64_t step, bool completed) {
  State* s = state_;
  std::lock_guard<std::mutex> lock(s->mutex);
  --s->in_flight;
  if (s->waiting > 0) s->wake_reader.notify_all();  // a reader may wait on in_flight alone
  if (!completed) return;
  s->steps[s->reads % s->steps.size()] = step;
  ++s->reads;
  // Halfway to the bound: start a pass now, so that it is usually done before a read has to wait for it.
  if (s->reads - s->verified == static_cast<uint64_t>(max_unverified_ + 1) / 2) {
    s->pass_wanted = true;
    s->wake_watcher.notify_one();
  }
}

}  // namespace gpuload
