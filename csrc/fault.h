// Turns a SIGBUS raised by a read from a memory-mapped shard into an error the caller can report.
// A shard truncated while it is mapped makes the next read of a lost page raise SIGBUS, which would
// otherwise kill the training process without a word about which file changed.
#pragma once

#include <cstdint>

namespace gpuload {

// Runs fn(arg) on this thread. Returns nullptr, or the faulting address if fn hit SIGBUS (fn is cut
// short: it must hold no locks or resources that need unwinding).
const void* run_guarding_sigbus(void (*fn)(void*), void* arg);

}  // namespace gpuload
