//! `cargo xtask run -- CMD...`: Kiln's main job end to end on a machine without hardware KVM. Sets
//! up the lab, boots a Kiln VM inside it (guest kernel + test initramfs), runs CMD in the guest and
//! prints what it printed. Exits 0 only if the guest ran CMD with status 0 and kiln-vmm exited 0.

use crate::guest_images;
use crate::lab::{self, LabRun, LabStatus};
use crate::util::Result;

/// Builds the guest's kernel command line asking init to run `argv` (single-quoted for `sh -c`).
/// The kernel's parser knows double quotes and nothing else, so `"` and newlines cannot be passed.
pub fn guest_cmdline(argv: &[String]) -> Result<String> {
    if argv.is_empty() {
        return Err("run: give the command to run in the guest after --".into());
    }
    let mut words = Vec::new();
    for a in argv {
        if a.contains('"') || a.contains('\n') {
            return Err(format!(
                "run: {a:?}: the kernel command line cannot carry '\"' or newlines"
            ));
        }
        words.push(format!("'{}'", a.replace('\'', r"'\''")));
    }
    Ok(format!(
        "console=ttyS0 reboot=k panic=-1 quiet KILN_RUN=\"{}\"",
        words.join(" ")
    ))
}

/// `cargo xtask run [--vcpus N] [--mem-mib N] -- CMD...`
pub fn main(args: &[String]) -> Result<u8> {
    let split = args
        .iter()
        .position(|a| a == "--")
        .ok_or("usage: cargo xtask run [--vcpus N] [--mem-mib N] -- CMD...")?;
    let (opts, cmd) = (&args[..split], &args[split + 1..]);
    let (mut vcpus, mut mem) = ("1".to_string(), "256".to_string());
    let mut it = opts.iter();
    while let Some(o) = it.next() {
        let slot = match o.as_str() {
            "--vcpus" => &mut vcpus,
            "--mem-mib" => &mut mem,
            other => return Err(format!("run: unknown option {other}")),
        };
        *slot = it.next().ok_or(format!("run: {o} needs a value"))?.clone();
    }
    let cmdline = guest_cmdline(cmd)?;
    let initramfs = guest_images::test_initramfs()?;
    let vm = vec![
        "kiln-vmm".into(),
        "--kernel".into(),
        "/kiln/vmlinux".into(),
        "--initrd".into(),
        "/kiln/test-initramfs.cpio".into(),
        "--vcpus".into(),
        vcpus,
        "--mem-mib".into(),
        mem,
        "--cmdline".into(),
        cmdline,
    ];
    let outcome = lab::run(&LabRun {
        files: vec![(initramfs, "test-initramfs.cpio".into())],
        cmd: vm,
        ..LabRun::default()
    })?;
    match outcome.status {
        LabStatus::Failed(why) => Err(format!("the lab failed, not the command: {why}")),
        LabStatus::Exited(code) => {
            let guest = outcome
                .output
                .lines()
                .find_map(|l| l.trim().strip_prefix("KILN-RUN-EXIT "))
                .and_then(|s| s.trim().parse::<i32>().ok());
            match (code, guest) {
                (0, Some(status)) => Ok(u8::try_from(status).unwrap_or(1)),
                (0, None) => {
                    Err("kiln-vmm exited 0 but the guest never reported the command's exit".into())
                }
                (vmm, _) => Err(format!("kiln-vmm exited with status {vmm}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_single_quoted_inside_the_kernel_parameter() {
        let argv = vec!["sh".to_string(), "-c".into(), "echo it's $((6*7))".into()];
        assert_eq!(
            guest_cmdline(&argv).unwrap(),
            r#"console=ttyS0 reboot=k panic=-1 quiet KILN_RUN="'sh' '-c' 'echo it'\''s $((6*7))'""#
        );
    }

    #[test]
    fn what_the_kernel_cannot_carry_is_refused() {
        assert!(guest_cmdline(&[]).is_err());
        assert!(
            guest_cmdline(&["echo \"hi\"".into()])
                .unwrap_err()
                .contains("cannot carry")
        );
        assert!(guest_cmdline(&["a\nb".into()]).is_err());
    }
}
