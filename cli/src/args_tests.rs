//! Every flag parses, every bad input is named.

use super::*;

fn args(s: &[&str]) -> Vec<String> {
    s.iter().map(|a| a.to_string()).collect()
}

fn run(s: &[&str]) -> RunArgs {
    match parse(&args(s)).unwrap() {
        Command::Run(a) => *a,
        other => panic!("{other:?}"),
    }
}

fn err(s: &[&str]) -> String {
    parse(&args(s)).unwrap_err()
}

#[test]
fn every_flag() {
    let a = run(&[
        "run",
        "--kernel",
        "/k",
        "--rootfs=/r",
        "--timeout",
        "1.5",
        "--env",
        "A=1",
        "-e",
        "B=x=y",
        "--env",
        "EMPTY=",
        "--cwd",
        "/tmp",
        "--user",
        "1000:1000",
        "--mem-mib",
        "512",
        "--vcpus=2",
        "--zram",
        "64M",
        "--free-page-reporting",
        "off",
        "--balloon-mib",
        "100",
        "--tty",
        "--json",
        "--boot-timeout",
        "9",
        "--",
        "sh",
        "-c",
        "echo --json",
    ]);
    assert_eq!(a.kernel.as_deref(), Some(Path::new("/k")));
    assert_eq!(a.rootfs.as_deref(), Some(Path::new("/r")));
    assert_eq!(a.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(
        a.env,
        vec![
            ("A".into(), "1".into()),
            ("B".into(), "x=y".into()),
            ("EMPTY".into(), "".into())
        ]
    );
    assert_eq!(a.cwd.as_deref(), Some("/tmp"));
    assert_eq!(a.user.as_deref(), Some("1000:1000"));
    assert_eq!((a.mem_mib, a.vcpus, a.tty, a.json), (512, 2, true, true));
    assert_eq!(
        (a.zram.as_deref(), a.free_page_reporting, a.balloon_mib),
        (Some("64M"), false, 100)
    );
    assert_eq!(a.boot_timeout, Duration::from_secs(9));
    assert_eq!(a.command, args(&["sh", "-c", "echo --json"]));
}

#[test]
fn defaults_and_command_without_dashes() {
    let a = run(&["run", "uname", "-a"]);
    assert_eq!(a.command, args(&["uname", "-a"]));
    assert_eq!(
        (a.mem_mib, a.vcpus, a.tty, a.json),
        (DEFAULT_MEM_MIB, 1, false, false)
    );
    assert_eq!((a.timeout, a.boot_timeout), (None, DEFAULT_BOOT_TIMEOUT));
    assert_eq!(
        (a.zram, a.free_page_reporting, a.balloon_mib),
        (None, true, 0)
    );
    assert_eq!(parse(&args(&["--help"])).unwrap(), Command::Help);
    assert_eq!(parse(&args(&["run", "--help"])).unwrap(), Command::Help);
    assert_eq!(parse(&args(&["-V"])).unwrap(), Command::Version);
}

#[test]
fn template_runs_take_code_or_a_command() {
    let a = run(&["run", "--template", "python", "-c", "print(1)"]);
    assert_eq!(
        (a.template.as_deref(), a.code.as_deref()),
        (Some("python"), Some("print(1)"))
    );
    let a = run(&["run", "--template", "base", "--lang", "sh", "--", "uname"]);
    assert_eq!(
        (a.lang.as_deref(), a.command.clone()),
        (Some("sh"), args(&["uname"]))
    );
    assert_eq!(
        err(&["run", "-c", "print(1)"]),
        "-c only works with --template"
    );
    assert_eq!(
        err(&["run", "--template", "p", "--vcpus", "2", "--", "true"]),
        "--vcpus cannot be used with --template: the template fixes the machine"
    );
    assert_eq!(
        err(&["run", "--template", "p", "-c", "x", "--", "true"]),
        "give either -c CODE or a command, not both"
    );
    // The network flags set the sandbox's policy and ports.
    let a = run(&[
        "run",
        "--template",
        "p",
        "--allow-domain",
        "pypi.org",
        "--publish",
        "8080",
        "--",
        "true",
    ]);
    assert!(a.net.nic && !a.net.allow_net);
    assert_eq!(a.net.domains[0].to_string(), "pypi.org");
    assert_eq!(a.net.publish[0].guest_port, 8080);
}

#[test]
fn bad_input_is_named() {
    assert_eq!(
        err(&[]),
        "no command given; try `kiln run -- CMD` or `kiln --help`"
    );
    assert_eq!(
        err(&["start"]),
        "unknown command \"start\" (run, snapshot, template, sandbox)"
    );
    assert_eq!(
        err(&["run"]),
        "no command to run: kiln run [OPTIONS] -- CMD [ARG...]"
    );
    assert_eq!(
        err(&["run", "--"]),
        "no command to run: kiln run [OPTIONS] -- CMD [ARG...]"
    );
    assert_eq!(err(&["run", "--bogus", "x"]), "unknown option --bogus");
    assert_eq!(
        err(&["run", "--env", "NOVALUE", "true"]),
        "--env \"NOVALUE\" is not NAME=VALUE"
    );
    assert_eq!(
        err(&["run", "--env", "=v", "true"]),
        "--env \"=v\" is not NAME=VALUE"
    );
    assert_eq!(err(&["run", "--env"]), "--env needs a value");
    assert_eq!(
        err(&["run", "--timeout", "soon", "true"]),
        "--timeout \"soon\" is not a positive number of seconds"
    );
    assert_eq!(
        err(&["run", "--timeout", "-1", "true"]),
        "--timeout \"-1\" is not a positive number of seconds"
    );
    assert_eq!(
        err(&["run", "--timeout=0", "true"]),
        "--timeout \"0\" is not a positive number of seconds"
    );
    assert_eq!(
        err(&["run", "--mem-mib", "lots", "true"]),
        "--mem-mib \"lots\" is not a positive whole number"
    );
    assert_eq!(
        err(&["run", "--vcpus", "0", "true"]),
        "--vcpus \"0\" is not a positive whole number"
    );
    assert_eq!(err(&["run", "--json=yes", "true"]), "--json takes no value");
    assert_eq!(err(&["run", "--snapshot"]), "--snapshot needs a value");
    assert_eq!(
        err(&["run", "--zram", "huge", "true"]),
        "--zram: zram size \"huge\" is not off, a size (N, NK, NM or NG) or N%"
    );
    assert_eq!(
        err(&["run", "--free-page-reporting", "yes", "true"]),
        "--free-page-reporting \"yes\" is not on or off"
    );
    assert_eq!(
        err(&["run", "--balloon-mib", "256", "true"]),
        "--balloon-mib 256 leaves nothing of --mem-mib 256"
    );
    for flag in [
        "--kernel",
        "--rootfs",
        "--mem-mib",
        "--vcpus",
        "--zram",
        "--free-page-reporting",
        "--balloon-mib",
    ] {
        let value = match flag {
            "--free-page-reporting" => "on",
            "--zram" => "1M",
            _ => "1",
        };
        assert_eq!(
            err(&["run", "--snapshot", "/s", flag, value, "true"]),
            format!("{flag} cannot be used with --snapshot: the snapshot fixes the machine")
        );
    }
}

#[test]
fn snapshot_runs_and_the_snapshot_command() {
    let a = run(&[
        "run",
        "--snapshot",
        "/snap",
        "--env",
        "K=V",
        "--timeout=2",
        "--",
        "true",
    ]);
    assert_eq!(a.snapshot.as_deref(), Some(Path::new("/snap")));
    assert_eq!(a.env, vec![("K".into(), "V".into())]);
    assert_eq!(a.timeout, Some(Duration::from_secs(2)));
    assert_eq!(run(&["run", "true"]).snapshot, None);
    assert_eq!(
        parse(&args(&["snapshot", "create", "--dir", "/d"])).unwrap(),
        Command::Snapshot(args(&["create", "--dir", "/d"]))
    );
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-args-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn images_come_from_flags_then_variables_then_the_lab() {
    let dir = scratch();
    let (k, r) = (dir.join("vmlinux"), dir.join("rootfs.ext4"));
    std::fs::write(&k, b"k").unwrap();
    std::fs::write(&r, b"r").unwrap();
    let none = |_: &str| None;
    let mut a = run(&["run", "true"]);
    a.kernel = Some(k.clone());
    a.rootfs = Some(r.clone());
    assert_eq!(
        Images::resolve(&a, none).unwrap(),
        Images {
            kernel: k.clone(),
            rootfs: r.clone()
        }
    );

    let vars = |v: &str| match v {
        "KILN_KERNEL" => Some(k.to_string_lossy().into_owned()),
        "KILN_ROOTFS" => Some(r.to_string_lossy().into_owned()),
        _ => None,
    };
    let plain = run(&["run", "true"]);
    assert_eq!(Images::resolve(&plain, vars).unwrap().kernel, k);

    if !Path::new(LAB_KERNEL).exists() {
        assert_eq!(
            Images::resolve(&plain, none).unwrap_err(),
            "kernel /kiln/vmlinux (from the default (set --kernel or $KILN_KERNEL)): \
             No such file or directory (os error 2)"
        );
    }
    let only_kernel = |v: &str| (v == "KILN_KERNEL").then(|| k.to_string_lossy().into_owned());
    let mut missing = run(&["run", "true"]);
    missing.rootfs = Some("/nonexistent/rootfs.ext4".into());
    assert_eq!(
        Images::resolve(&missing, only_kernel).unwrap_err(),
        "rootfs /nonexistent/rootfs.ext4 (from --rootfs): No such file or directory (os error 2)"
    );
    let mut a_dir = run(&["run", "true"]);
    a_dir.kernel = Some(dir.clone());
    assert_eq!(
        Images::resolve(&a_dir, none).unwrap_err(),
        format!("kernel {} (from --kernel) is not a file", dir.display())
    );
    let comma = dir.join("a,b.ext4");
    std::fs::write(&comma, b"r").unwrap();
    let mut c = run(&["run", "true"]);
    c.kernel = Some(k.clone());
    c.rootfs = Some(comma.clone());
    assert!(
        Images::resolve(&c, none)
            .unwrap_err()
            .contains("contains a comma")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn network_flags() {
    let a = run(&["run", "--", "true"]);
    assert_eq!(a.net, NetArgs::default(), "no network unless asked");
    let a = run(&[
        "run",
        "--allow-domain",
        "pypi.org",
        "--allow-domain=*.pythonhosted.org",
        "--publish",
        "8080",
        "-p",
        "18000:8000",
        "--",
        "true",
    ]);
    assert!(
        a.net.nic && !a.net.allow_net,
        "--allow-domain implies a NIC"
    );
    assert_eq!(
        a.net
            .domains
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>(),
        ["pypi.org", "*.pythonhosted.org"]
    );
    assert_eq!(
        a.net
            .publish
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>(),
        ["8080", "18000:8000"]
    );
    let a = run(&["run", "--allow-net", "--", "true"]);
    assert!(a.net.nic && a.net.allow_net);
    let a = run(&["run", "--publish", "80", "--", "true"]);
    assert!(!a.net.nic, "publishing alone needs no NIC");
    assert!(run(&["run", "--net", "--", "true"]).net.nic);
    assert_eq!(
        err(&["run", "--allow-domain", "bad name", "--", "true"]),
        "--allow-domain \"bad name\" is not a domain name (letters, digits and '-' in dot-separated labels of 1 to 63 characters)"
    );
    assert_eq!(
        err(&["run", "--publish", "0", "--", "true"]),
        "--publish \"0\" is not [HOSTPORT:]GUESTPORT with ports from 1 to 65535"
    );
    assert!(
        err(&[
            "run",
            "--allow-net",
            "--allow-domain",
            "a.test",
            "--",
            "true"
        ])
        .contains("not both")
    );
    assert_eq!(
        err(&["run", "--net=yes", "--", "true"]),
        "--net takes no value"
    );
}
