//! A group's `balance`, with `[group.peak_ewma]`'s settings, validated.

use super::diagnostic::did_you_mean;
use super::raw::RawGroup;
use super::validate::Validator;
use crate::core::backend::{Balance, EwmaSettings};
use crate::core::stats::Signal;

impl Validator<'_, '_> {
    /// `balance`, with `peak_ewma`'s settings (which need it).
    pub(super) fn balance(&mut self, group: &str, raw: &RawGroup) -> Balance {
        let ewma = |v: &mut Self| {
            let Some(t) = raw.peak_ewma.as_ref() else {
                return EwmaSettings::default();
            };
            let t = t.get_ref();
            let d = EwmaSettings::default();
            let signal = match t.signal.as_ref().map(|s| (s, s.get_ref().as_str())) {
                None | Some((_, "exchange")) => Signal::Exchange,
                Some((_, "connect")) => Signal::Connect,
                Some((s, other)) => {
                    v.rep.error(
                        s.span(),
                        format!("group `{group}`: peak_ewma.signal `{other}` is not a signal it can read"),
                        Some("write \"exchange\" (each request/response turn) or \"connect\"".into()),
                    );
                    d.signal
                }
            };
            EwmaSettings {
                signal,
                decay: v.duration(t.decay.as_ref(), "peak_ewma.decay", d.decay),
                default_rtt: v.duration(
                    t.default_rtt.as_ref(),
                    "peak_ewma.default_rtt",
                    d.default_rtt,
                ),
            }
        };
        let balance = match raw.balance.as_ref() {
            None => Balance::default(),
            Some(s) => match Balance::from_name(s.get_ref()) {
                Some(Balance::PeakEwma(_)) => Balance::PeakEwma(ewma(self)),
                Some(b) => b,
                None => {
                    self.rep.error(
                        s.span(),
                        format!("group `{group}`: unknown balance `{}`", s.get_ref()),
                        did_you_mean(s.get_ref(), Balance::NAMES),
                    );
                    Balance::default()
                }
            },
        };
        if let Some(t) = &raw.peak_ewma
            && !matches!(balance, Balance::PeakEwma(_))
        {
            self.rep.error(
                t.span(),
                format!(
                    "group `{group}`: [group.peak_ewma] is set but the group balances by {}",
                    balance.name()
                ),
                Some("set balance = \"peak_ewma\", or remove the table".into()),
            );
        }
        balance
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Balance, Config};
    use crate::core::stats::Signal;
    use std::path::Path;
    use std::time::Duration;

    fn with(group: &str) -> Result<Config, String> {
        let text = format!(
            "[[group]]\nname = \"g\"\nbackends = [\"127.0.0.1:9\"]\n{group}\n\n\
             [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:8000\"]\nprimary = \"g\"\n"
        );
        Config::parse(Path::new("b.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn balancers_and_their_settings() {
        assert_eq!(
            with("balance = \"source_hash\"").unwrap().groups[0].balance,
            Balance::SourceHash
        );
        let Balance::PeakEwma(e) = with("balance = \"peak_ewma\"").unwrap().groups[0].balance
        else {
            panic!("peak_ewma")
        };
        assert_eq!(
            (e.signal, e.decay, e.default_rtt),
            (
                Signal::Exchange,
                Duration::from_secs(10),
                Duration::from_millis(30)
            )
        );
        let c = with("balance = \"peak_ewma\"\npeak_ewma = { signal = \"connect\", decay = \"2s\", default_rtt = \"5ms\" }").unwrap();
        let Balance::PeakEwma(e) = c.groups[0].balance else {
            panic!("peak_ewma")
        };
        assert_eq!(
            (e.signal, e.decay, e.default_rtt),
            (
                Signal::Connect,
                Duration::from_secs(2),
                Duration::from_millis(5)
            )
        );
    }

    #[test]
    fn mistakes_name_the_line_and_the_fix() {
        for (group, want) in [
            ("balance = \"peak_ewa\"", "unknown balance `peak_ewa`"),
            ("balance = \"peak_ewa\"", "peak_ewma"),
            (
                "balance = \"peak_ewma\"\npeak_ewma = { signal = \"first_byte\" }",
                "peak_ewma.signal `first_byte` is not a signal it can read",
            ),
            (
                "balance = \"peak_ewma\"\npeak_ewma = { decay = \"soon\" }",
                "peak_ewma.decay",
            ),
            (
                "peak_ewma = { decay = \"1s\" }",
                "[group.peak_ewma] is set but the group balances by round_robin",
            ),
            (
                "balance = \"peak_ewma\"\npeak_ewma = { rtt = \"1s\" }",
                "unknown field `rtt`",
            ),
        ] {
            let err = with(group).expect_err(want);
            assert!(err.contains(want), "want {want:?} in:\n{err}");
        }
    }
}
