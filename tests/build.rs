include!("../scripts/link_torch.rs");

fn main() {
    link_torch();
}
