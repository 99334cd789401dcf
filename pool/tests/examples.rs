//! The bundled template specs parse, and name the packages `cargo xtask` makes images ahead for.

use kiln_pool::template::spec::Spec;

#[test]
fn bundled_specs_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for (name, mem, packages) in [
        ("base", 256, vec!["python3"]),
        (
            "python",
            512,
            vec!["python3", "python3-numpy", "python3-pandas"],
        ),
    ] {
        let spec = Spec::load(&dir.join(format!("{name}.toml"))).unwrap();
        assert_eq!((spec.name.as_str(), spec.mem_mib), (name, mem));
        let debian = spec.from.debian.expect("a Debian template");
        assert_eq!(
            debian.packages, packages,
            "xtask's rootfs::PYTHON_PACKAGES must match"
        );
    }
}
