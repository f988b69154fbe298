//! The release-critical link facts: the binary keeps libtorch_cuda (rustc's
//! `--as-needed` would drop it and CUDA would silently report unavailable) and
//! finds libtorch through its rpath, without LD_LIBRARY_PATH.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kv-distill");

fn dynamic_section() -> String {
    let out = Command::new("readelf")
        .args(["-d", BIN])
        .output()
        .expect("readelf (binutils) must be installed");
    assert!(out.status.success(), "readelf failed on {BIN}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn binary_links_libtorch_cuda_when_libtorch_has_it() {
    let lib = env!("KVD_LIBTORCH_LIB");
    let dynamic = dynamic_section();
    let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
    if Path::new(lib).join("libtorch_cuda.so").exists() {
        assert!(
            needed.iter().any(|l| l.contains("[libtorch_cuda.so]")),
            "libtorch_cuda.so is not NEEDED by {BIN}:\n{}",
            needed.join("\n")
        );
    }
    assert!(
        needed.iter().any(|l| l.contains("[libtorch_cpu.so]")),
        "libtorch_cpu.so is not NEEDED by {BIN}"
    );
    assert!(
        dynamic
            .lines()
            .any(|l| (l.contains("(RUNPATH)") || l.contains("(RPATH)")) && l.contains(lib)),
        "no rpath to {lib} in {BIN}"
    );
}

#[test]
fn binary_starts_without_library_path_and_reports_cuda() {
    let out = Command::new(BIN)
        .arg("devices")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run kv-distill");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cuda_available="),
        "unexpected output: {text}"
    );
}
