//! Tests of kiln-vmm's command line: flags, device specs, and what is refused by name.

use super::*;

fn parse(args: &[&str]) -> Result<Command, String> {
    parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

fn config(args: &[&str]) -> VmConfig {
    match parse(args).unwrap() {
        Command::Run {
            config: Some(c), ..
        } => *c,
        other => panic!("expected a config, got {other:?}"),
    }
}

#[test]
fn flags_build_a_config_with_defaults() {
    let c = config(&[
        "--kernel",
        "/k",
        "--vcpus=2",
        "--cmdline",
        "console=ttyS0 quiet",
    ]);
    assert_eq!(c.boot_source.kernel_image_path, PathBuf::from("/k"));
    assert_eq!(
        crate::config::boot_args(&c.boot_source),
        "console=ttyS0 quiet"
    );
    assert_eq!(c.machine.vcpu_count, 2);
    assert_eq!(c.machine.mem_size_mib, 128);
    let c = config(&[
        "--kernel",
        "/k",
        "--initrd",
        "/i",
        "--mem-mib",
        "512",
        "--serial-out",
        "/o",
    ]);
    assert_eq!(c.boot_source.initrd_path, Some(PathBuf::from("/i")));
    assert_eq!(
        crate::config::boot_args(&c.boot_source),
        super::super::DEFAULT_BOOT_ARGS
    );
    assert_eq!(c.machine.mem_size_mib, 512);
    assert_eq!(c.serial.serial_out_path, Some(PathBuf::from("/o")));
}

#[test]
fn the_balloon_flag_adds_a_balloon() {
    let c = config(&[
        "--kernel",
        "/k",
        "--balloon",
        "free_page_reporting,deflate_on_oom",
    ]);
    let b = c.balloon.unwrap();
    assert!(b.free_page_reporting && b.deflate_on_oom);
    assert_eq!(config(&["--kernel", "/k"]).balloon, None);
    assert_eq!(
        parse(&["--kernel", "/k", "--balloon", "-", "--balloon", "-"]).unwrap_err(),
        "--balloon given more than once"
    );
    assert_eq!(
        parse(&["--config-file", "/c.json", "--balloon", "-"]).unwrap_err(),
        "--balloon cannot be combined with --config-file"
    );
}

#[test]
fn api_socket_alone_or_with_a_config() {
    match parse(&["--api-sock", "/run/k.sock", "--serial-out", "/o"]).unwrap() {
        Command::Run {
            config: None,
            api_sock,
            serial,
            no_seccomp: false,
            ..
        } => {
            assert_eq!(api_sock, Some(PathBuf::from("/run/k.sock")));
            assert_eq!(serial.serial_out_path, Some(PathBuf::from("/o")));
        }
        other => panic!("expected an API-only run, got {other:?}"),
    }
    match parse(&["--kernel", "/k", "--api-sock", "/run/k.sock"]).unwrap() {
        Command::Run {
            config: Some(c),
            api_sock: Some(_),
            ..
        } => {
            assert_eq!(c.boot_source.kernel_image_path, PathBuf::from("/k"))
        }
        other => panic!("expected a configured run with an API, got {other:?}"),
    }
    assert_eq!(
        parse(&["--api-sock", "/s", "--vcpus", "2"]).unwrap_err(),
        "--vcpus needs --kernel; with only --api-sock, configure it over the API"
    );
}

#[test]
fn seccomp_is_on_unless_no_seccomp_is_given() {
    let no_seccomp = |args: &[&str]| match parse(args).unwrap() {
        Command::Run { no_seccomp, .. } => no_seccomp,
        other => panic!("expected a run, got {other:?}"),
    };
    assert!(!no_seccomp(&["--kernel", "/k"]));
    assert!(no_seccomp(&["--kernel", "/k", "--no-seccomp"]));
    assert!(no_seccomp(&["--no-seccomp", "--api-sock", "/s"]));
    assert_eq!(
        parse(&["--kernel", "/k", "--no-seccomp=yes"]).unwrap_err(),
        "--no-seccomp takes no value"
    );
}

#[test]
fn firecracker_process_options() {
    let process = |args: &[&str]| match parse(args).unwrap() {
        Command::Run { process, .. } => *process,
        other => panic!("expected a run, got {other:?}"),
    };
    let p = process(&[
        "--api-sock",
        "/s",
        "--id",
        "vm-1",
        "--log-path",
        "/l",
        "--level",
        "debug",
        "--show-level",
        "--show-log-origin",
        "--metrics-path",
        "/m",
        "--boot-timer",
        "--start-time-us",
        "100",
        "--start-time-cpu-us",
        "7",
        "--parent-cpu-time-us",
        "3",
        "--http-api-max-payload-size",
        "1000",
        "--mmds-size-limit",
        "2000",
        "--seccomp-filter",
        "/f.bpf",
    ]);
    assert_eq!(p.id.as_deref(), Some("vm-1"));
    assert_eq!(p.logger.log_path, Some(PathBuf::from("/l")));
    assert_eq!(p.logger.level, Some(LogLevel::Debug));
    assert_eq!(
        (p.logger.show_level, p.logger.show_log_origin),
        (Some(true), Some(true))
    );
    assert_eq!(p.metrics_path, Some(PathBuf::from("/m")));
    assert!(p.boot_timer);
    assert_eq!(
        (p.start_time_us, p.start_time_cpu_us, p.parent_cpu_time_us),
        (Some(100), Some(7), Some(3))
    );
    assert_eq!((p.max_payload, p.mmds_size_limit), (Some(1000), Some(2000)));
    assert_eq!(p.seccomp_filter, Some(PathBuf::from("/f.bpf")));
    assert!(p.has_logger());
    assert!(!process(&["--kernel", "/k", "--no-api"]).has_logger());
    assert_eq!(
        parse(&["--describe-snapshot", "/snap"]).unwrap(),
        Command::DescribeSnapshot("/snap".into())
    );
    for (args, want) in [
        (
            &["--api-sock", "/s", "--id", "bad id"][..],
            "--id \"bad id\" must be 1 to 64 letters, digits or '-'",
        ),
        (
            &["--api-sock", "/s", "--level", "loud"][..],
            "--level \"loud\" is not one of Error, Warning, Info, Debug, Trace, Off",
        ),
        (
            &["--api-sock", "/s", "--no-api"][..],
            "--no-api cannot be combined with --api-sock",
        ),
        (
            &["--api-sock", "/s", "--boot-timer=1"][..],
            "--boot-timer takes no value",
        ),
        (
            &["--api-sock", "/s", "--http-api-max-payload-size", "0"][..],
            "--http-api-max-payload-size must be at least 1 byte",
        ),
        (
            &["--api-sock", "/s", "--no-seccomp", "--seccomp-filter", "/f"][..],
            "--no-seccomp cannot be combined with --seccomp-filter",
        ),
    ] {
        assert_eq!(parse(args).unwrap_err(), want, "{args:?}");
    }
}

#[test]
fn help_and_version() {
    assert_eq!(parse(&["--help"]).unwrap(), Command::Help);
    assert_eq!(parse(&["--kernel", "/k", "-V"]).unwrap(), Command::Version);
}

#[test]
fn mistakes_name_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "--kernel PATH or --config-file FILE is required"),
        (&["--kernel"], "--kernel needs a value"),
        (
            &["--kernel", "/k", "--vcpus", "two"],
            "--vcpus \"two\" is not a valid number",
        ),
        (
            &["--kernel", "/k", "--vcpus", "300"],
            "--vcpus \"300\" is not a valid number",
        ),
        (
            &["--kernel", "/k", "--mem-mib", "-5"],
            "--mem-mib \"-5\" is not a valid number",
        ),
        (
            &["--kernel", "/k", "--frobnicate"],
            "unknown option --frobnicate",
        ),
        (
            &["--kernel", "/k", "stray"],
            "unexpected argument \"stray\"",
        ),
        (
            &["--kernel", "/a", "--kernel", "/b"],
            "--kernel given more than once",
        ),
        (
            &["--config-file", "/c.json", "--vcpus", "2"],
            "--vcpus cannot be combined with --config-file",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(parse(args).unwrap_err(), *want, "args {args:?}");
    }
}
