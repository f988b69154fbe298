//! Build script: links libtorch (scripts/link_torch.rs) and builds the C++
//! shims: CUDA graphs, operator counts and the kernel profiler.

include!("../scripts/link_torch.rs");

use std::path::{Path, PathBuf};

fn main() {
    link_torch();
    cuda_graph_shim();
    // Counts of dispatched operators (`bench-step --count-ops`).
    torch_shim("op_count");
    // libtorch's Kineto profiler (`bench-step --profile`).
    torch_shim("kernel_profile");
}

/// Compiles `csrc/NAME.cpp` against libtorch's headers (CPU or CUDA) into
/// the static library `kvd_NAME`.
fn torch_shim(name: &str) {
    let src = format!("csrc/{name}.cpp");
    println!("cargo:rerun-if-changed={src}");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_default());
    let include = lib.join("../include");
    cc::Build::new()
        .cpp(true)
        .file(&src)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .compile(&format!("kvd_{name}"));
}

/// Compiles `csrc/cuda_graph.cpp` (CUDA graph capture for the training step)
/// when libtorch has CUDA and the CUDA runtime headers are found, and sets the
/// `kvd_cuda_graphs` cfg; without them the step runs without graphs.
fn cuda_graph_shim() {
    println!("cargo::rustc-check-cfg=cfg(kvd_cuda_graphs)");
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_default());
    if !lib.join("libtorch_cuda.so").exists() {
        return;
    }
    let torch_include = lib.join("../include");
    let Some(cuda_include) = cuda_include(&lib) else {
        println!("cargo:warning=CUDA runtime headers not found: CUDA graphs disabled");
        return;
    };
    cc::Build::new()
        .cpp(true)
        .file("csrc/cuda_graph.cpp")
        .include(&torch_include)
        .include(&cuda_include)
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .compile("kvd_cuda_graph");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-cfg=kvd_cuda_graphs");
}

/// A directory with the CUDA runtime API headers and the `crt/` headers they
/// include: `$CUDA_HOME/include`, `/usr/local/cuda/include`, or the copy that
/// Triton (installed with torch) ships; torch's `nvidia/cu13` wheel lacks `crt/`.
/// Only host API declarations are used, which are stable across CUDA versions.
fn cuda_include(torch_lib: &Path) -> Option<PathBuf> {
    let site = torch_lib.join("../..");
    let mut candidates: Vec<PathBuf> = std::env::var("CUDA_HOME")
        .ok()
        .map(|h| PathBuf::from(h).join("include"))
        .into_iter()
        .collect();
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates.push(site.join("nvidia/cu13/include"));
    candidates.push(site.join("triton/backends/nvidia/include"));
    candidates
        .into_iter()
        .find(|d| d.join("cuda_runtime_api.h").exists() && d.join("crt/host_defines.h").exists())
}
