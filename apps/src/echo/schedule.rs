//! The deterministic failure schedule behind `--fail-fraction`.
//!
//! Random failures would make tests assert ranges; instead request `n` (0-based) fails when
//! `floor((n+1)·F) > floor(n·F)`, so the first `N` requests contain exactly `floor(N·F)`
//! failures, spread evenly. `F` is held in parts per million so that the arithmetic is exact
//! integer arithmetic (0.1 is not exact as a float).

use std::fmt;
use std::str::FromStr;

const PPM: u128 = 1_000_000;

/// A fraction in `0..=1`, with a resolution of one part per million.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailFraction {
    ppm: u32,
}

impl FailFraction {
    pub const ZERO: FailFraction = FailFraction { ppm: 0 };

    /// Whether request number `n` (counting from 0) is one of the failing ones.
    pub fn fails(self, n: u64) -> bool {
        // u128: (n + 1) · 10^6 overflows u64 once n passes ~1.8·10^13.
        let ppm = u128::from(self.ppm);
        let n = u128::from(n);
        (n + 1) * ppm / PPM > n * ppm / PPM
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.ppm) / 1e6
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a fraction must be a number from 0 to 1, got {0:?}")]
pub struct FractionError(String);

impl FromStr for FailFraction {
    type Err = FractionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value: f64 = s.trim().parse().map_err(|_| FractionError(s.to_string()))?;
        if !(0.0..=1.0).contains(&value) {
            return Err(FractionError(s.to_string()));
        }
        // In range, so the rounded value fits u32 (at most 10^6).
        Ok(FailFraction { ppm: (value * 1e6).round() as u32 })
    }
}

impl fmt::Display for FailFraction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failures(fraction: &str, requests: u64) -> Vec<u64> {
        let f: FailFraction = fraction.parse().unwrap();
        (0..requests).filter(|&n| f.fails(n)).collect()
    }

    #[test]
    fn exact_counts() {
        assert_eq!(failures("0.1", 200).len(), 20);
        assert_eq!(failures("0.25", 1000).len(), 250);
        assert_eq!(failures("0.333", 1000).len(), 333);
        assert_eq!(failures("0", 1000).len(), 0);
        assert_eq!(failures("1", 1000).len(), 1000);
        assert_eq!(failures("0.000001", 1_000_000).len(), 1);
    }

    #[test]
    fn spread_evenly() {
        // One in ten: the 10th, 20th, 30th request (0-based 9, 19, 29).
        assert_eq!(failures("0.1", 30), vec![9, 19, 29]);
        assert_eq!(failures("0.5", 6), vec![1, 3, 5]);
    }

    #[test]
    fn every_prefix_is_exact() {
        let f: FailFraction = "0.3".parse().unwrap();
        let mut failed = 0;
        for n in 0..500u64 {
            failed += u64::from(f.fails(n));
            assert_eq!(failed, (n + 1) * 3 / 10, "after {} requests", n + 1);
        }
    }

    #[test]
    fn huge_request_numbers_do_not_overflow() {
        let f: FailFraction = "1".parse().unwrap();
        assert!(f.fails(u64::MAX - 1));
    }

    #[test]
    fn parse_rejects_out_of_range() {
        for bad in ["-0.1", "1.01", "abc", "", "NaN", "inf"] {
            assert!(bad.parse::<FailFraction>().is_err(), "{bad:?} should be rejected");
        }
        assert_eq!("0.5".parse::<FailFraction>().unwrap().to_string(), "0.5");
    }
}
