//! A template build's progress: on a terminal, a spinner with the current step and the time
//! since the build began (build commands' output scrolls above it); otherwise plain lines.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use kiln_pool::types::BuildEvent;

/// Shows build events.
pub struct Progress {
    bar: Option<ProgressBar>,
    start: Instant,
    steps: usize,
}

impl Progress {
    /// A spinner on a terminal (`fancy`), plain lines otherwise.
    pub fn new(fancy: bool) -> Progress {
        let bar = fancy.then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress {
            bar,
            start: Instant::now(),
            steps: 0,
        }
    }

    /// Shows one event.
    pub fn event(&mut self, ev: &BuildEvent) {
        let at = self.start.elapsed().as_secs_f64();
        match ev {
            BuildEvent::Step { name } => {
                self.steps += 1;
                let text = format!("step {}: {name}", self.steps);
                match &self.bar {
                    Some(b) => b.set_message(text),
                    None => eprintln!("[{at:7.1} s] {text}"),
                }
            }
            BuildEvent::Output { line } => match &self.bar {
                Some(b) => b.println(format!("  | {line}")),
                None => eprintln!("[{at:7.1} s]   | {line}"),
            },
            BuildEvent::Progress { done, total } => {
                let text = match total {
                    Some(t) => format!("{} of {} MiB", done >> 20, t >> 20),
                    None => format!("{} MiB", done >> 20),
                };
                match &self.bar {
                    Some(b) => b.set_message(text),
                    None => eprintln!("[{at:7.1} s]   {text}"),
                }
            }
            BuildEvent::Done { .. } | BuildEvent::Failed { .. } => {}
        }
    }

    /// Clears the spinner.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        eprintln!("build took {:.1} s", self.start.elapsed().as_secs_f64());
    }
}
