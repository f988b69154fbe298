// Counts the operators libtorch dispatches, for Rust (src/op_count.rs): a
// global RecordFunction callback (the profiler's mechanism) that counts
// top-level calls (from the caller, not from inside another operator), the
// backward's nodes and the operators they call. At small shapes a GPU step's time is its host-side
// dispatch, which grows with these counts.

#include <ATen/record_function.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <cstdlib>
#include <cstring>
#include <exception>

namespace {

std::atomic<uint64_t> top_level{0};
std::atomic<uint64_t> nested{0};
std::atomic<uint64_t> backward_nodes{0};
std::atomic<uint64_t> backward_ops{0};
thread_local int depth = 0;
// The depth of the backward node being run on this thread (-1: none).
thread_local int node_depth = -1;
thread_local int saved_node_depth[256];
at::CallbackHandle handle = 0;
// With names on: counts of top-level operators and backward nodes by name.
std::atomic<bool> by_name{false};
std::mutex names_lock;
std::map<std::string, uint64_t> names;

void count_name(const at::RecordFunction& fn) {
  if (!by_name.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> g(names_lock);
  names[fn.name()]++;
}

// The autograd engine wraps each node in an "evaluate_function" record.
bool engine_wrapper(const at::RecordFunction& fn) {
  static const char prefix[] = "autograd::engine::evaluate_function";
  return std::strncmp(fn.name(), prefix, sizeof(prefix) - 1) == 0;
}

std::unique_ptr<at::ObserverContext> on_enter(const at::RecordFunction& fn) {
  if (depth < 256) saved_node_depth[depth] = node_depth;
  if (fn.scope() == at::RecordScope::BACKWARD_FUNCTION) {
    backward_nodes.fetch_add(1, std::memory_order_relaxed);
    count_name(fn);
    node_depth = depth;
  } else if (engine_wrapper(fn)) {
    // Neither an operator nor a node: the node inside it is counted.
  } else if (node_depth >= 0 && depth == node_depth + 1) {
    backward_ops.fetch_add(1, std::memory_order_relaxed);
    count_name(fn);
  } else if (depth == 0) {
    top_level.fetch_add(1, std::memory_order_relaxed);
    count_name(fn);
  } else {
    nested.fetch_add(1, std::memory_order_relaxed);
  }
  depth++;
  return nullptr;
}

void on_exit(const at::RecordFunction&, at::ObserverContext*) {
  depth--;
  if (depth >= 0 && depth < 256) node_depth = saved_node_depth[depth];
}

char* message(const char* what) {
  char* out = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (out != nullptr) std::strcpy(out, what);
  return out;
}

}  // namespace

extern "C" {

void kvd_oc_free_error(char* e) { std::free(e); }

// Starts counting (once; later calls keep the first callback).
char* kvd_oc_start() {
  try {
    if (handle == 0) {
      handle = at::addGlobalCallback(
          at::RecordFunctionCallback(on_enter, on_exit)
              .needsInputs(false)
              .needsOutputs(false)
              .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
    }
    return nullptr;
  } catch (const std::exception& e) {
    return message(e.what());
  } catch (...) {
    return message("unknown C++ exception");
  }
}

// The counts so far: operators called directly (not by another operator nor
// by a backward node), operators called from inside another, autograd nodes
// run by the backward, operators those nodes called directly.
void kvd_oc_read(uint64_t* top, uint64_t* inner, uint64_t* nodes, uint64_t* node_ops) {
  *top = top_level.load(std::memory_order_relaxed);
  *inner = nested.load(std::memory_order_relaxed);
  *nodes = backward_nodes.load(std::memory_order_relaxed);
  *node_ops = backward_ops.load(std::memory_order_relaxed);
}

// Turns counting by name on or off (slower: a lock per operator).
void kvd_oc_by_name(int on) { by_name.store(on != 0, std::memory_order_relaxed); }

// The counts by name so far as "name\tcount\n" lines, malloc'd (the caller
// frees it with kvd_oc_free_error), and clears them.
char* kvd_oc_take_names() {
  std::string out;
  {
    std::lock_guard<std::mutex> g(names_lock);
    for (const auto& [name, n] : names) {
      out += name;
      out += '\t';
      out += std::to_string(n);
      out += '\n';
    }
    names.clear();
  }
  return message(out.c_str());
}

}  // extern "C"
