//! Turns kilnd's copy of the envd schema (`proto/envd/*.proto`) into prost message types with
//! proto3 JSON mappings (pbjson), for the E2B-compatible in-sandbox API. Only the daemon needs
//! them; without its feature nothing is generated.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/envd");
    if std::env::var_os("CARGO_FEATURE_DAEMON").is_none() {
        return Ok(());
    }
    generate()
}

#[cfg(feature = "daemon")]
fn generate() -> Result<(), Box<dyn std::error::Error>> {
    use prost::Message;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(["envd/process.proto", "envd/filesystem.proto"], ["proto"])?;
    let mut cfg = prost_build::Config::new();
    cfg.compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .out_dir(&out);
    cfg.compile_fds(fds.clone())?;
    pbjson_build::Builder::new()
        .register_descriptors(&fds.encode_to_vec())?
        .out_dir(&out)
        // A newer SDK may send fields this schema lacks; the binary codec skips them too.
        .ignore_unknown_fields()
        .build(&[".process", ".filesystem"])?;
    Ok(())
}

#[cfg(not(feature = "daemon"))]
fn generate() -> Result<(), Box<dyn std::error::Error>> {
    let _ = PathBuf::new();
    Ok(())
}
