#include "fault.h"

#include <csetjmp>
#include <csignal>
#include <cstring>
#include <mutex>

namespace gpuload {
namespace {

thread_local sigjmp_buf* tl_jump = nullptr;
thread_local const void* tl_fault_address = nullptr;
struct sigaction previous_action;
std::mutex install_mutex;

void on_sigbus(int sig, siginfo_t* info, void* context) {
  if (tl_jump != nullptr) {
    tl_fault_address = info->si_addr;
    siglongjmp(*tl_jump, 1);
  }
  // Not ours: hand the signal to whoever was installed before (Python's faulthandler, or the default).
  if (previous_action.sa_flags & SA_SIGINFO) {
    previous_action.sa_sigaction(sig, info, context);
  } else if (previous_action.sa_handler != SIG_IGN && previous_action.sa_handler != SIG_DFL) {
    previous_action.sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);
    raise(sig);
  }
}

// (Re)installs the handler when another one (e.g. faulthandler enabled later) has replaced it.
void ensure_handler() {
  struct sigaction current;
  sigaction(SIGBUS, nullptr, &current);
  if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus) return;
  std::lock_guard<std::mutex> lock(install_mutex);
  struct sigaction action;
  std::memset(&action, 0, sizeof(action));
  action.sa_sigaction = on_sigbus;
  action.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  struct sigaction replaced;
  sigaction(SIGBUS, &action, &replaced);
  const bool was_ours = (replaced.sa_flags & SA_SIGINFO) && replaced.sa_sigaction == on_sigbus;
  if (!was_ours) previous_action = replaced;  // never chain to ourselves
}

}  // namespace

const void* run_guarding_sigbus(void (*fn)(void*), void* arg) {
  ensure_handler();
  sigjmp_buf jump;
  // No signal mask to save: SA_NODEFER leaves SIGBUS unblocked inside the handler we jump out of.
  if (sigsetjmp(jump, 0) != 0) {
    tl_jump = nullptr;
    return tl_fault_address;
  }
  tl_jump = &jump;
  fn(arg);
  tl_jump = nullptr;
  return nullptr;
}

}  // namespace gpuload
