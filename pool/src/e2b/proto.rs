//! envd's message types, generated at build time from `proto/envd/*.proto` (prost for the binary
//! codec, pbjson for proto3's JSON mapping, which the e2b SDKs use).

#![allow(missing_docs, clippy::all)]

/// `process.proto`.
pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// `filesystem.proto`.
pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}
