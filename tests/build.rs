//! Build script: links libtorch (scripts/link_torch.rs) for the test binaries.

include!("../scripts/link_torch.rs");

fn main() {
    link_torch();
}
