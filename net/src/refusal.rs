//! Every connection or lookup a sandbox was refused, with the VM's id and the name or address:
//! the resolver reports names it would not answer, the proxy connections it would not make, and
//! the packet filter (through NFLOG) everything else it dropped. The owner of the sandbox sees
//! each one as it happens (`kiln run` prints it) and can list them afterwards (`--json`).

use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Refusals kept for the list; later ones are only counted (the live callback sees all).
pub const KEPT: usize = 1000;

/// What was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The VM.
    pub vm: String,
    /// `dns`, `tcp`, `udp`, `icmp` or `ip` (another protocol).
    pub proto: String,
    /// The name asked for (DNS), or named by TLS SNI or the HTTP Host header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The destination, `addr:port` or `addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vm {}: refused {}", self.vm, self.proto)?;
        if let Some(name) = &self.name {
            write!(f, " {name}")?;
        }
        if let Some(dest) = &self.dest {
            write!(f, " to {dest}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

type Notify = Box<dyn Fn(&Refusal) + Send + Sync>;

#[derive(Default)]
struct State {
    kept: Vec<Refusal>,
    total: u64,
}

/// Where refusals go: a callback for each, and a bounded list.
#[derive(Clone)]
pub struct Refusals {
    vm: Arc<str>,
    state: Arc<Mutex<State>>,
    notify: Arc<Option<Notify>>,
}

impl Refusals {
    /// Refusals of VM `vm`, each also given to `notify` as it happens.
    pub fn new(vm: &str, notify: Option<Notify>) -> Self {
        Self {
            vm: vm.into(),
            state: Arc::default(),
            notify: Arc::new(notify),
        }
    }

    /// Records one.
    pub fn record(
        &self,
        proto: &str,
        name: Option<String>,
        dest: Option<String>,
        reason: impl Into<String>,
    ) {
        let r = Refusal {
            vm: self.vm.to_string(),
            proto: proto.into(),
            name,
            dest,
            reason: reason.into(),
        };
        if let Some(notify) = self.notify.as_ref() {
            notify(&r);
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.total += 1;
        if s.kept.len() < KEPT {
            s.kept.push(r);
        }
    }

    /// The refusals kept so far, and how many there were in all.
    pub fn list(&self) -> (Vec<Refusal>, u64) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.kept.clone(), s.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_and_kept_up_to_a_bound() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let r = Refusals::new(
            "kiln-7",
            Some(Box::new(move |r: &Refusal| {
                sink.lock().unwrap().push(r.to_string())
            })),
        );
        r.record(
            "dns",
            Some("blocked.test".into()),
            None,
            "not an allowed domain",
        );
        r.record(
            "tcp",
            None,
            Some("10.0.0.1:22".into()),
            "the private range 10.0.0.0/8",
        );
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            [
                "vm kiln-7: refused dns blocked.test: not an allowed domain",
                "vm kiln-7: refused tcp to 10.0.0.1:22: the private range 10.0.0.0/8"
            ]
        );
        for _ in 0..KEPT + 10 {
            r.record("udp", None, Some("1.2.3.4:443".into()), "only DNS");
        }
        let (kept, total) = r.list();
        assert_eq!((kept.len(), total), (KEPT, KEPT as u64 + 12));
        let json = serde_json::to_value(&kept[0]).unwrap();
        assert_eq!(json["name"], "blocked.test");
        assert!(json.get("dest").is_none());
    }
}
