//! Listing sandboxes for E2B's list calls: the filters (state, metadata, template, start time),
//! the order and the pages (`nextToken` is an offset this kilnd gave out), and each sandbox's
//! JSON.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::rest::ApiError;
use super::state::{E2b, ENVD_VERSION};
use super::time::{parse_rfc3339, rfc3339};
use crate::daemon::sandbox::Sandbox;

type Result<T> = std::result::Result<T, ApiError>;

/// A sandbox as the lists show it.
pub fn listed(sb: &Sandbox) -> Value {
    let info = sb.info();
    json!({
        "templateID": info.template,
        "alias": info.template,
        "sandboxID": info.id,
        "clientID": "kiln",
        "startedAt": rfc3339(info.created_at),
        "endAt": rfc3339(info.expires_at),
        "cpuCount": info.vcpus,
        "memoryMB": info.mem_mib,
        "diskSizeMB": sb.spec.disk_mib.unwrap_or(0),
        "state": info.state.as_str(),
        "envdVersion": ENVD_VERSION,
        "metadata": info.metadata,
    })
}

/// Percent-decodes one piece of a query (`+` is a space).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The filters and paging of a list request.
pub struct Listing {
    states: Option<Vec<String>>,
    metadata: Vec<(String, String)>,
    template: Option<String>,
    started_after: Option<u64>,
    desc: bool,
    limit: usize,
    offset: usize,
}

/// The filters and paging a list request's query asks for (v2 pages by 100 unless told).
pub fn listing(q: &BTreeMap<String, String>, v2: bool) -> Result<Listing> {
    for k in q.keys() {
        let known = [
            "metadata",
            "state",
            "template",
            "startedAfter",
            "order",
            "limit",
            "nextToken",
        ];
        if !known.contains(&k.as_str()) {
            return Err(ApiError::bad(format!(
                "unknown query parameter {k:?}: use {}",
                known.join(", ")
            )));
        }
    }
    let states = match q.get("state") {
        None => None,
        Some(s) => {
            let list: Vec<String> = s.split(',').map(|x| x.trim().to_string()).collect();
            if let Some(bad) = list.iter().find(|x| *x != "running" && *x != "paused") {
                return Err(ApiError::bad(format!(
                    "state {bad:?} is not running or paused"
                )));
            }
            Some(list)
        }
    };
    let metadata = q
        .get("metadata")
        .map(|m| {
            m.split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default();
    let started_after =
        match q.get("startedAfter") {
            None => None,
            Some(t) => Some(parse_rfc3339(t).ok_or_else(|| {
                ApiError::bad(format!("startedAfter {t:?} is not an RFC 3339 time"))
            })?),
        };
    let desc = match q.get("order").map(String::as_str) {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => return Err(ApiError::bad(format!("order {o:?} is not asc or desc"))),
    };
    let limit = match q.get("limit") {
        None => {
            if v2 {
                100
            } else {
                usize::MAX
            }
        }
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| ApiError::bad(format!("limit {l:?} is outside 1..=1000")))?,
    };
    let offset = match q.get("nextToken") {
        None => 0,
        Some(t) => t
            .parse()
            .map_err(|_| ApiError::bad(format!("nextToken {t:?} is not one this kilnd gave")))?,
    };
    Ok(Listing {
        states,
        metadata,
        template: q.get("template").cloned(),
        started_after,
        desc,
        limit,
        offset,
    })
}

/// One page of the sandboxes `l` selects, and the token of the next page if there is one.
pub fn list(e2b: &E2b, l: &Listing) -> (Vec<Value>, Option<String>) {
    let mut all: Vec<Arc<Sandbox>> = e2b
        .daemon
        .all_sandboxes()
        .into_iter()
        .filter(|s| {
            let info = s.info();
            l.states
                .as_ref()
                .is_none_or(|st| st.iter().any(|x| x == info.state.as_str()))
                && l.metadata
                    .iter()
                    .all(|(k, v)| info.metadata.get(k) == Some(v))
                && l.template
                    .as_ref()
                    .is_none_or(|t| *t == info.template || *t == info.template_id)
                && l.started_after.is_none_or(|t| info.created_at >= t)
        })
        .collect();
    if l.desc {
        all.reverse();
    }
    let page: Vec<Value> = all
        .iter()
        .skip(l.offset)
        .take(l.limit)
        .map(|s| listed(s))
        .collect();
    let next =
        (l.offset.saturating_add(l.limit) < all.len()).then(|| (l.offset + l.limit).to_string());
    (page, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_decode_twice_encoded_pairs() {
        let mut q = BTreeMap::new();
        q.insert("metadata".to_string(), "team=a%20b&k=v%26w".to_string());
        q.insert("state".to_string(), "running,paused".to_string());
        let l = listing(&q, true).unwrap();
        assert_eq!(
            l.metadata,
            vec![
                ("team".to_string(), "a b".to_string()),
                ("k".to_string(), "v&w".to_string())
            ]
        );
        assert_eq!(l.limit, 100);
        q.insert("state".to_string(), "sleeping".to_string());
        assert!(listing(&q, true).is_err());
        let mut q = BTreeMap::new();
        q.insert("limt".to_string(), "3".to_string());
        assert!(listing(&q, true).is_err());
    }
}
