//! Probe health with rise/fall hysteresis (HAProxy's model): a backend goes
//! down after `fall` consecutive failed probes and comes back after `rise`
//! consecutive good ones.

/// Where one backend's probes stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeHealth {
    up: bool,
    streak: u32,
    rise: u32,
    fall: u32,
}

/// A change of state caused by a probe result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentDown,
    CameUp,
}

impl ProbeHealth {
    /// Starts up: a backend is trusted until `fall` probes say otherwise,
    /// so a restart of the proxy does not empty every group.
    pub fn new(rise: u32, fall: u32) -> Self {
        assert!(rise > 0 && fall > 0, "rise and fall are at least 1");
        ProbeHealth {
            up: true,
            streak: 0,
            rise,
            fall,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Takes one probe result; says when the state flips.
    pub fn observe(&mut self, ok: bool) -> Option<Transition> {
        if ok == self.up {
            // Agrees with the current state: any streak toward flipping ends.
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(if ok {
            Transition::CameUp
        } else {
            Transition::WentDown
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds results and returns the step (1-based) of each transition.
    fn check(rise: u32, fall: u32, results: &str, want: &[(usize, Transition)]) {
        let mut h = ProbeHealth::new(rise, fall);
        let got: Vec<(usize, Transition)> = results
            .chars()
            .enumerate()
            .filter_map(|(i, c)| h.observe(c == '+').map(|t| (i + 1, t)))
            .collect();
        assert_eq!(got, want, "rise {rise} fall {fall} results {results}");
    }

    #[test]
    fn rise_and_fall_table() {
        use Transition::*;
        check(2, 3, "+++", &[]);
        check(2, 3, "---", &[(3, WentDown)]);
        check(2, 3, "--+--", &[]);
        check(2, 3, "---++", &[(3, WentDown), (5, CameUp)]);
        check(2, 3, "---+-++", &[(3, WentDown), (7, CameUp)]);
        check(1, 1, "-+-", &[(1, WentDown), (2, CameUp), (3, WentDown)]);
    }
}
