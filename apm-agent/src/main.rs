fn main() {
    std::process::exit(apm_agent::cli::main());
}
