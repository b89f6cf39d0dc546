//! Generates the protocol types. protoc comes from the `protoc-bin-vendored` crate so that a
//! fresh machine needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    tonic_prost_build::configure()
        // Payloads stay `bytes::Bytes` end to end: encoding a batch never copies a profile.
        .bytes(".bitville.apm.v1.Profile.payload")
        .compile_protos(&["apm.proto"], &["."])?;
    println!("cargo:rerun-if-changed=apm.proto");
    Ok(())
}
