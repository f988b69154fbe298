// CUDA graph capture and replay of libtorch work, for Rust (src/cuda_graph.rs).
// tch has no binding for at::cuda::CUDAGraph or for CUDA streams; this file is
// the smallest C surface over both. Every function catches C++ exceptions and
// returns them as a malloc'd message (NULL on success), freed by the caller
// with kvd_cg_free_error.

#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace {

char* message(const char* what) {
  char* out = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (out != nullptr) std::strcpy(out, what);
  return out;
}

template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return message(e.what());
  } catch (...) {
    return message("unknown C++ exception");
  }
}

// `waiter` waits (on the device) for the work queued so far on `done`.
// (Through c10's device-generic event: ATen's CUDAEvent header needs the CUDA
// compiler's headers, and calling the runtime directly would link libcudart.)
void wait_for(const c10::cuda::CUDAStream& waiter, const c10::cuda::CUDAStream& done) {
  c10::Event event(c10::DeviceType::CUDA);
  event.record(done.unwrap());
  event.block(waiter.unwrap());
}

}  // namespace

extern "C" {

void kvd_cg_free_error(char* e) { std::free(e); }

// A stream from libtorch's pool on `device`, for capturing.
char* kvd_cg_stream_new(int device, void** out) {
  return guarded([&] {
    *out = new c10::cuda::CUDAStream(
        c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device)));
  });
}

void kvd_cg_stream_free(void* s) { delete static_cast<c10::cuda::CUDAStream*>(s); }

// Makes `side` this thread's current stream on its device, after the work
// queued on the previous current stream; `*prev` receives that stream.
char* kvd_cg_stream_enter(void* side, void** prev) {
  return guarded([&] {
    auto* s = static_cast<c10::cuda::CUDAStream*>(side);
    auto* p = new c10::cuda::CUDAStream(c10::cuda::getCurrentCUDAStream(s->device_index()));
    wait_for(*s, *p);
    c10::cuda::setCurrentCUDAStream(*s);
    *prev = p;
  });
}

// Restores `prev` (from kvd_cg_stream_enter, freed here) as the current
// stream, ordered after the work queued on `side`.
char* kvd_cg_stream_exit(void* side, void* prev) {
  return guarded([&] {
    auto* s = static_cast<c10::cuda::CUDAStream*>(side);
    auto* p = static_cast<c10::cuda::CUDAStream*>(prev);
    c10::cuda::setCurrentCUDAStream(*p);
    wait_for(*p, *s);
    delete p;
  });
}

char* kvd_cg_graph_new(void** out) {
  return guarded([&] { *out = new at::cuda::CUDAGraph(); });
}

void kvd_cg_graph_free(void* g) { delete static_cast<at::cuda::CUDAGraph*>(g); }

// Starts capturing the current (non-default) stream into `g`, with a private memory pool.
char* kvd_cg_capture_begin(void* g) {
  return guarded([&] { static_cast<at::cuda::CUDAGraph*>(g)->capture_begin(); });
}

char* kvd_cg_capture_end(void* g) {
  return guarded([&] { static_cast<at::cuda::CUDAGraph*>(g)->capture_end(); });
}

// Launches `g` on the current stream.
char* kvd_cg_replay(void* g) {
  return guarded([&] { static_cast<at::cuda::CUDAGraph*>(g)->replay(); });
}

// Returns the caching allocator's unused blocks to the device, so a capture's
// private pool does not stack on top of memory cached by earlier eager work.
char* kvd_cg_empty_cache() {
  return guarded([&] { c10::cuda::CUDACachingAllocator::emptyCache(); });
}

}  // extern "C"
