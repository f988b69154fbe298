// Shared build-script body (included by each crate that links libtorch).
// rustc links with `--as-needed`, which drops libtorch_cuda.so because no symbol
// of it is referenced directly; CUDA then reports unavailable. Force it in and
// add an rpath so binaries find libtorch without LD_LIBRARY_PATH.
fn link_torch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_default();
    if lib.is_empty() {
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=KVD_LIBTORCH_LIB={lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
