//! Head sampling by the OpenTelemetry samplers, decided from the trace id so that every agent
//! (and every SDK using the same rule) keeps or drops the same traces; and the agent's own
//! rules that keep error and slow spans whatever was decided.

use crate::config::Sampling;

/// How the root of a trace is decided.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Root {
    On,
    Off,
    /// Keep when the trace id's 56 random bits are at least this threshold (the W3C trace
    /// context level 2 randomness and OpenTelemetry's consistent probability sampling).
    Ratio {
        threshold: u64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sampler {
    root: Root,
    /// Follow a remote parent's sampled flag (the `parentbased_*` samplers).
    parent_based: bool,
    pub keep_errors: bool,
    pub keep_slower_than_ns: Option<u64>,
}

impl Default for Sampler {
    fn default() -> Self {
        Self {
            root: Root::On,
            parent_based: true,
            keep_errors: false,
            keep_slower_than_ns: None,
        }
    }
}

const RANDOM_BITS: u32 = 56;

fn threshold(ratio: f64) -> u64 {
    let max = 1u64 << RANDOM_BITS;
    ((1.0 - ratio.clamp(0.0, 1.0)) * max as f64).round() as u64
}

impl Sampler {
    pub fn from_config(s: &Sampling) -> anyhow::Result<Self> {
        let name = s.sampler.trim().to_ascii_lowercase();
        let (parent_based, root_name) = match name.strip_prefix("parentbased_") {
            Some(r) => (true, r.to_string()),
            None => (false, name.clone()),
        };
        let root = match root_name.as_str() {
            "always_on" => Root::On,
            "always_off" => Root::Off,
            "traceidratio" => {
                let ratio = s.arg.unwrap_or(1.0);
                if !(0.0..=1.0).contains(&ratio) || ratio.is_nan() {
                    anyhow::bail!(
                        "the sampler argument must be a ratio between 0 and 1, got {ratio}"
                    );
                }
                Root::Ratio {
                    threshold: threshold(ratio),
                }
            }
            _ => anyhow::bail!(
                "sampler `{}` is not supported (always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio)",
                s.sampler
            ),
        };
        Ok(Self {
            root,
            parent_based,
            keep_errors: s.keep_errors,
            keep_slower_than_ns: s.keep_slower_than_ms.map(|ms| ms * 1_000_000),
        })
    }

    /// A trace that starts here.
    pub fn root_sampled(&self, trace_id: &[u8; 16]) -> bool {
        match self.root {
            Root::On => true,
            Root::Off => false,
            Root::Ratio { threshold } => {
                let mut low = [0u8; 8];
                low.copy_from_slice(&trace_id[8..]);
                let random = u64::from_be_bytes(low) & ((1u64 << RANDOM_BITS) - 1);
                random >= threshold
            }
        }
    }

    /// A trace that arrived with a header whose sampled flag is `flag`.
    pub fn remote_sampled(&self, trace_id: &[u8; 16], flag: bool) -> bool {
        if self.parent_based {
            flag
        } else {
            self.root_sampled(trace_id)
        }
    }

    /// The agent's own rules: an unsampled span kept anyway.
    pub fn keep_anyway(&self, error: bool, duration_ns: u64) -> bool {
        (self.keep_errors && error) || self.keep_slower_than_ns.is_some_and(|t| duration_ns >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(name: &str, arg: Option<f64>) -> Sampler {
        Sampler::from_config(&Sampling {
            sampler: name.into(),
            arg,
            ..Default::default()
        })
        .unwrap()
    }

    fn ids(n: usize) -> Vec<[u8; 16]> {
        let mut rng = fastrand::Rng::with_seed(7);
        (0..n)
            .map(|_| {
                let mut id = [0u8; 16];
                rng.fill(&mut id);
                id
            })
            .collect()
    }

    #[test]
    fn ratio_keeps_its_share_of_random_ids() {
        let ids = ids(100_000);
        for ratio in [0.0, 0.01, 0.25, 0.5, 0.9, 1.0] {
            let s = sampler("traceidratio", Some(ratio));
            let kept = ids.iter().filter(|id| s.root_sampled(id)).count() as f64;
            let share = kept / ids.len() as f64;
            assert!((share - ratio).abs() < 0.006, "{ratio}: {share}");
        }
    }

    #[test]
    fn a_smaller_ratio_keeps_a_subset() {
        // Consistent: what 10% keeps, 50% keeps too (agents with different ratios never
        // split a trace the smaller one kept).
        let (small, large) = (
            sampler("traceidratio", Some(0.1)),
            sampler("traceidratio", Some(0.5)),
        );
        for id in ids(10_000) {
            assert!(!small.root_sampled(&id) || large.root_sampled(&id));
        }
    }

    #[test]
    fn the_decision_is_the_trace_ids_alone() {
        let s = sampler("traceidratio", Some(0.5));
        let mut id = [0xffu8; 16];
        assert!(s.root_sampled(&id));
        // Only the low 56 bits count: the high bits may be anything.
        id[9..].fill(0);
        assert!(!s.root_sampled(&id));
        id[..9].fill(0);
        id[9] = 0x80;
        assert!(s.root_sampled(&id));
    }

    #[test]
    fn parent_based_follows_the_header() {
        let id = [0u8; 16];
        let pb = sampler("parentbased_always_off", None);
        assert!(!pb.root_sampled(&id));
        assert!(pb.remote_sampled(&id, true));
        assert!(!pb.remote_sampled(&id, false));
        let plain = sampler("always_on", None);
        assert!(
            plain.remote_sampled(&id, false),
            "not parent-based: the root rule"
        );
        assert_eq!(Sampler::default(), sampler("parentbased_always_on", None));
    }

    #[test]
    fn local_rules() {
        let s = Sampler::from_config(&Sampling {
            sampler: "always_off".into(),
            arg: None,
            keep_errors: true,
            keep_slower_than_ms: Some(250),
        })
        .unwrap();
        assert!(s.keep_anyway(true, 1));
        assert!(s.keep_anyway(false, 250_000_000));
        assert!(!s.keep_anyway(false, 249_999_999));
        assert!(!sampler("always_off", None).keep_anyway(true, u64::MAX));
    }

    #[test]
    fn bad_samplers_are_named() {
        let err = |n: &str, a: Option<f64>| {
            Sampler::from_config(&Sampling {
                sampler: n.into(),
                arg: a,
                ..Default::default()
            })
            .unwrap_err()
            .to_string()
        };
        assert!(err("jaeger_remote", None).contains("jaeger_remote"));
        assert!(err("traceidratio", Some(1.5)).contains("1.5"));
    }
}
