//! A member's windows on the wire, `GET /fleet/window/{listener}`: per
//! group, what `GroupInput` holds, with each histogram in HdrHistogram's
//! compact V2 form (base64), so the leader's merge is exact.

use crate::core::policy::GroupInput;
use crate::core::stats::{Distribution, Signal};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowWire {
    pub member: String,
    pub listener: String,
    pub signal: String,
    pub groups: Vec<GroupWire>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupWire {
    pub name: String,
    /// The policy's signal over the window, V2-serialized, base64.
    pub latency: String,
    pub latency_failures: u64,
    pub probe: String,
    pub probe_failures: u64,
    pub attempts: u64,
    pub failed: u64,
    pub active_connections: u64,
    pub new_connections_per_second: f64,
}

pub fn signal_named(name: &str) -> Option<Signal> {
    Signal::ALL.into_iter().find(|s| s.name() == name)
}

fn encode(d: &Distribution) -> String {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(&d.hist, &mut buf)
        .expect("a histogram serializes into memory");
    B64.encode(buf)
}

fn decode(text: &str, failures: u64) -> Result<Distribution, String> {
    let bytes = B64
        .decode(text)
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    let hist = Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .map_err(|e| format!("histogram does not decode: {e:?}"))?;
    Ok(Distribution { hist, failures })
}

impl GroupWire {
    pub fn of(name: &str, g: &GroupInput) -> Self {
        GroupWire {
            name: name.to_owned(),
            latency: encode(&g.latency),
            latency_failures: g.latency.failures,
            probe: encode(&g.probe),
            probe_failures: g.probe.failures,
            attempts: g.attempts,
            failed: g.failed,
            active_connections: g.active_connections,
            new_connections_per_second: g.new_connections_per_second,
        }
    }

    pub fn input(&self) -> Result<GroupInput, String> {
        Ok(GroupInput {
            latency: decode(&self.latency, self.latency_failures)?,
            probe: decode(&self.probe, self.probe_failures)?,
            attempts: self.attempts,
            failed: self.failed,
            active_connections: self.active_connections,
            new_connections_per_second: self.new_connections_per_second,
        })
    }
}

impl WindowWire {
    /// The inputs, checked against the groups the reader expects.
    pub fn inputs(&self, groups: &[String]) -> Result<Vec<GroupInput>, String> {
        let names: Vec<&str> = self.groups.iter().map(|g| g.name.as_str()).collect();
        if names != groups.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(format!(
                "member `{}` has groups {names:?} on listener `{}`, not {groups:?}; its config differs",
                self.member, self.listener
            ));
        }
        self.groups.iter().map(GroupWire::input).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::stats::new_histogram;

    #[test]
    fn round_trip_keeps_every_bucket() {
        let mut latency = Distribution::empty();
        for v in [5u64, 900, 2_000, 2_001, 310_000, 9_000_000] {
            latency.hist.record_n(v, (v % 7 + 1) as u32).unwrap();
        }
        latency.failures = 3;
        let input = GroupInput {
            latency,
            probe: Distribution {
                hist: new_histogram(),
                failures: 1,
            },
            attempts: 40,
            failed: 4,
            active_connections: 2,
            new_connections_per_second: 1.5,
        };
        let wire = WindowWire {
            member: "a".into(),
            listener: "l".into(),
            signal: "exchange".into(),
            groups: vec![GroupWire::of("primary", &input)],
        };
        let back = serde_json::from_str::<WindowWire>(&serde_json::to_string(&wire).unwrap())
            .unwrap()
            .inputs(&["primary".to_owned()])
            .unwrap();
        assert_eq!(back[0].latency.hist, input.latency.hist);
        assert_eq!(back[0].latency.failures, 3);
        assert_eq!(back[0].probe.failures, 1);
        assert_eq!((back[0].attempts, back[0].failed), (40, 4));
        assert!(wire.inputs(&["other".to_owned()]).is_err());
        assert_eq!(signal_named("first_byte"), Some(Signal::FirstByte));
    }
}
