// Times of the operators and device kernels of a stretch of work, for Rust
// (src/kernel_profile.rs): libtorch's Kineto profiler, what torch.profiler
// uses, over the CPU's operators and, in a CUDA build with CUPTI, the GPU's
// kernels, memory copies and sets; aggregated by device and name. It answers
// which kernels a step's device time goes to, the table bench/kvdistill_ref.py
// --profile gives for the PyTorch reference.

#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <set>
#include <string>
#include <utility>

namespace {

namespace prof = torch::autograd::profiler;
namespace pimpl = torch::profiler::impl;

char* copy_string(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

// Tabs and newlines would break the lines handed to Rust.
std::string clean(std::string name) {
  for (char& c : name) {
    if (c == '\t' || c == '\n' || c == '\r') c = ' ';
  }
  return name;
}

}  // namespace

extern "C" {

void kvd_kp_free(char* s) { std::free(s); }

// Starts profiling CPU operators and, with `cuda`, the device's activity.
// Returns null or an error message (free with kvd_kp_free).
char* kvd_kp_start(int cuda) {
  try {
    // Without a device, Kineto's start logs a failed GPU count as an error;
    // its log level (unless the user set one) keeps that quiet.
    if (cuda == 0) setenv("KINETO_LOG_LEVEL", "5", 0);
    pimpl::ProfilerConfig cfg(pimpl::ProfilerState::KINETO);
    std::set<pimpl::ActivityType> acts{pimpl::ActivityType::CPU};
    if (cuda != 0) acts.insert(pimpl::ActivityType::CUDA);
    prof::prepareProfiler(cfg, acts);
    prof::enableProfiler(cfg, acts);
    return nullptr;
  } catch (const std::exception& e) {
    return copy_string(e.what());
  } catch (...) {
    return copy_string("unknown exception starting the profiler");
  }
}

// Stops profiling and sets `*out` to one line per (device, name):
// "device\tname\tcount\ttotal_ns\n", device "cpu" or "cuda" (free with
// kvd_kp_free). Returns null or an error message.
char* kvd_kp_stop(char** out) {
  try {
    auto result = prof::disableProfiler();
    std::map<std::pair<std::string, std::string>, std::pair<uint64_t, uint64_t>> sums;
    if (result) {
      for (const auto& e : result->events()) {
        std::string dev = e.deviceType() == c10::DeviceType::CUDA ? "cuda" : "cpu";
        auto& s = sums[{dev, clean(e.name())}];
        s.first += 1;
        s.second += e.durationNs();
      }
    }
    std::string text;
    for (const auto& [key, s] : sums) {
      text += key.first + '\t' + key.second + '\t' + std::to_string(s.first) + '\t' +
              std::to_string(s.second) + '\n';
    }
    *out = copy_string(text);
    return nullptr;
  } catch (const std::exception& e) {
    return copy_string(e.what());
  } catch (...) {
    return copy_string("unknown exception stopping the profiler");
  }
}

}  // extern "C"
