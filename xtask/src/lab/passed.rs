//! Which lab test binaries have passed in this process's lab runs, as the runner in L1 announces
//! them on its console, so that a lab stage whose L1 goes down can go on in a new L1 with the rest.

/// What the lab test runner prints, before a test binary's name, when that binary passed.
pub const PASSED_MARK: &str = "@@KILN-PASSED ";

/// The test binaries CMD has reported passed ([`PASSED_MARK`]) in this process's lab runs.
static PASSED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Notes a console line of CMD's: a [`PASSED_MARK`] line adds its binary to [`passed_so_far`].
pub(crate) fn note_console_line(line: &str) {
    if let Some(name) = line.trim().strip_prefix(PASSED_MARK) {
        let mut passed = PASSED.lock().unwrap_or_else(|p| p.into_inner());
        if !passed.iter().any(|p| p == name) {
            passed.push(name.to_string());
        }
    }
}

/// The test binaries reported passed so far, in order.
pub fn passed_so_far() -> Vec<String> {
    PASSED.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passed_marks_are_collected_once_each_and_other_lines_are_not() {
        note_console_line("== lab_boot-1");
        note_console_line("@@KILN-PASSED lab_boot-1");
        note_console_line("@@KILN-PASSED lab_boot-1\r");
        note_console_line("test passed_mark ... ok");
        note_console_line("@@KILN-PASSED lab_net-2");
        let passed = passed_so_far();
        assert!(passed.ends_with(&["lab_boot-1".to_string(), "lab_net-2".to_string()]));
        assert_eq!(passed.iter().filter(|p| *p == "lab_boot-1").count(), 1);
    }
}
