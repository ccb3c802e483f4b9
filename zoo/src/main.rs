//! The `spin` command: see `spin --help`.
fn main() {
    std::process::exit(zoo::cli::main());
}
