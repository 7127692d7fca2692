//! Choosing the backends that receive a new message — PowerMail's ServerSelect.
//!
//! Pure logic, no I/O: the caller passes the backends that are healthy and
//! writable right now, and gets up to K distinct ones back. The order of
//! preference, for each copy in turn:
//!
//! 1. a backend in a group (failure domain) that holds no copy yet — two
//!    copies on one host survive less than two copies on two hosts;
//! 2. then the highest `priority`;
//! 3. then at random, weighted by free bytes, so fuller disks fill more
//!    slowly and backends with equal space share the load equally, and by
//!    speed (ServerSelect's spread by load): each candidate's weight is
//!    multiplied by `best_cost / its_cost`, where
//!    `cost = (latency_ewma_us + slack_us) * (in_flight + 1)` and `best_cost`
//!    is the lowest cost in its tier. A backend 100 times slower than the
//!    others gets a small share, never none (the factor has a floor,
//!    [`LatencyWeighting::factor_min_permille`]); backends within `slack_us`
//!    of each other share about equally. A candidate with no latency known
//!    yet counts as the fastest known one, so a new backend is tried at once.
//!
//! Fewer than K candidates give fewer than K ids; the caller decides what
//! that means (powersmtp answers 451).

use rand::Rng;

/// A backend that may receive a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The caller's identifier, returned as chosen.
    pub id: usize,
    /// Failure domain.
    pub group: &'a str,
    /// Higher is preferred.
    pub priority: i32,
    /// Free space, the weight among otherwise equal candidates.
    pub free_bytes: u64,
    /// Observed round-trip latency (an EWMA), `None` when not measured yet.
    pub latency_us: Option<u64>,
    /// Requests (checked-out connections) under way on it now.
    pub in_flight: usize,
}

/// How observed latency and load bend the choice among candidates of one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyWeighting {
    /// Added to every latency before comparing, so that differences well
    /// below it (noise: an fsync more or less) hardly change the spread.
    pub slack_us: u64,
    /// The least factor, in thousandths, a slow or loaded backend's weight is
    /// multiplied by: it keeps a share, however slow. 1000 turns the
    /// weighting off (free space only); 0 is taken as 1.
    pub factor_min_permille: u32,
}

impl LatencyWeighting {
    /// Free space only, as before latency-awareness.
    pub const OFF: LatencyWeighting = LatencyWeighting {
        slack_us: 0,
        factor_min_permille: 1000,
    };
}

/// Picks up to `k` distinct candidates, in the order of preference above.
/// Returns their `id`s, first choice first.
pub fn select<R: Rng + ?Sized>(
    candidates: &[Candidate<'_>],
    k: usize,
    weighting: LatencyWeighting,
    rng: &mut R,
) -> Vec<usize> {
    let mut remaining: Vec<Candidate<'_>> = candidates.to_vec();
    let mut used_groups: Vec<&str> = Vec::with_capacity(k);
    let mut chosen = Vec::with_capacity(k.min(candidates.len()));
    while chosen.len() < k && !remaining.is_empty() {
        let key = |c: &Candidate<'_>| (!used_groups.contains(&c.group), c.priority);
        let best = remaining.iter().map(key).max().expect("not empty");
        let tier: Vec<usize> = (0..remaining.len())
            .filter(|&i| key(&remaining[i]) == best)
            .collect();
        let pick = tier[weighted_index(&tier, &remaining, weighting, rng)];
        let c = remaining.swap_remove(pick);
        used_groups.push(c.group);
        chosen.push(c.id);
    }
    debug_assert!(chosen.len() <= k);
    chosen
}

/// The cost of a candidate for the latency factor: slower or busier is dearer.
fn cost(c: &Candidate<'_>, unknown_us: u64, slack_us: u64) -> f64 {
    let latency_us = c.latency_us.unwrap_or(unknown_us);
    (latency_us.saturating_add(slack_us) as f64 + 1.0) * (c.in_flight as f64 + 1.0)
}

/// An index into `tier`, drawn with probability proportional to free space
/// (in MiB, plus one so that a full but writable backend can still be drawn)
/// times the latency factor (see the module documentation).
fn weighted_index<R: Rng + ?Sized>(
    tier: &[usize],
    all: &[Candidate<'_>],
    weighting: LatencyWeighting,
    rng: &mut R,
) -> usize {
    let floor = f64::from(weighting.factor_min_permille.clamp(1, 1000)) / 1000.0;
    let unknown_us = tier
        .iter()
        .filter_map(|&i| all[i].latency_us)
        .min()
        .unwrap_or(0);
    let best = tier
        .iter()
        .map(|&i| cost(&all[i], unknown_us, weighting.slack_us))
        .fold(f64::INFINITY, f64::min);
    let weights: Vec<f64> = tier
        .iter()
        .map(|&i| {
            let space = ((all[i].free_bytes >> 20) + 1) as f64;
            let factor = best / cost(&all[i], unknown_us, weighting.slack_us);
            space * factor.clamp(floor, 1.0)
        })
        .collect();
    let total: f64 = weights.iter().sum();
    // Every weight is at least 0.001 (space >= 1, factor >= floor): total > 0.
    let mut x = rng.gen_range(0.0..total);
    for (n, w) in weights.iter().enumerate() {
        if x < *w {
            return n;
        }
        x -= w;
    }
    // Rounding can leave x a hair above the last weight.
    tier.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const GIB: u64 = 1 << 30;

    /// The defaults of the frontends' `[backend_pool]`.
    const ON: LatencyWeighting = LatencyWeighting {
        slack_us: 10_000,
        factor_min_permille: 20,
    };

    fn c(id: usize, group: &'static str, priority: i32, free_bytes: u64) -> Candidate<'static> {
        Candidate {
            id,
            group,
            priority,
            free_bytes,
            latency_us: None,
            in_flight: 0,
        }
    }

    /// `c` with an observed latency and load.
    fn timed(
        id: usize,
        group: &'static str,
        latency_us: u64,
        in_flight: usize,
    ) -> Candidate<'static> {
        Candidate {
            latency_us: Some(latency_us),
            in_flight,
            ..c(id, group, 0, GIB)
        }
    }

    fn counts(cands: &[Candidate<'_>], k: usize, runs: usize) -> Vec<usize> {
        counts_with(cands, k, runs, ON)
    }

    fn counts_with(
        cands: &[Candidate<'_>],
        k: usize,
        runs: usize,
        weighting: LatencyWeighting,
    ) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut n = vec![0; cands.len()];
        for _ in 0..runs {
            let got = select(cands, k, weighting, &mut rng);
            assert_eq!(got.len(), k.min(cands.len()));
            let mut sorted = got.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), got.len(), "distinct");
            for id in got {
                n[id] += 1;
            }
        }
        n
    }

    #[test]
    fn picks_k_distinct_or_all_there_are() {
        let cands = [c(0, "a", 0, GIB), c(1, "b", 0, GIB), c(2, "c", 0, GIB)];
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(select(&cands, 2, ON, &mut rng).len(), 2);
        assert_eq!(select(&cands, 5, ON, &mut rng).len(), 3);
        assert!(select(&cands, 0, ON, &mut rng).is_empty());
        assert!(select(&[], 2, ON, &mut rng).is_empty());
    }

    #[test]
    fn random_among_equals() {
        let cands = [c(0, "a", 0, GIB), c(1, "b", 0, GIB), c(2, "c", 0, GIB)];
        let n = counts(&cands, 1, 3000);
        for (id, hits) in n.iter().enumerate() {
            assert!(
                (850..=1150).contains(hits),
                "backend {id} chosen {hits}/3000"
            );
        }
    }

    #[test]
    fn higher_priority_first() {
        let cands = [
            c(0, "a", 0, 100 * GIB),
            c(1, "b", 5, GIB),
            c(2, "c", 5, GIB),
        ];
        let n = counts(&cands, 2, 500);
        assert_eq!(n, vec![0, 500, 500]);
        // The third copy falls back to the lower priority.
        let n = counts(&cands, 3, 10);
        assert_eq!(n, vec![10, 10, 10]);
    }

    #[test]
    fn distinct_groups_before_priority() {
        let cands = [c(0, "h1", 9, GIB), c(1, "h1", 9, GIB), c(2, "h2", 0, GIB)];
        let n = counts(&cands, 2, 400);
        assert_eq!(n[2], 400, "the only other group always gets a copy");
        assert_eq!(n[0] + n[1], 400);
        assert!(n[0] > 100 && n[1] > 100, "{n:?}");
    }

    #[test]
    fn spread_by_free_space() {
        let cands = [c(0, "a", 0, 3 * GIB), c(1, "b", 0, GIB)];
        let n = counts(&cands, 1, 4000);
        assert!((2800..=3200).contains(&n[0]), "{n:?}");
        // A full but writable backend is still drawn now and then.
        let cands = [c(0, "a", 0, 0), c(1, "b", 0, 0)];
        let n = counts(&cands, 1, 1000);
        assert!(n[0] > 300 && n[1] > 300, "{n:?}");
    }

    #[test]
    fn a_100x_slower_backend_gets_a_small_share() {
        // 2 ms against 200 ms (a 100 ms each-way delay), one copy each.
        let cands = [
            timed(0, "a", 2_000, 0),
            timed(1, "b", 2_000, 0),
            timed(2, "c", 200_000, 0),
        ];
        let n = counts(&cands, 1, 6000);
        assert!(n[2] > 0, "never starved: {n:?}");
        assert!(n[2] < 6000 / 3 / 5, "slow share {n:?}");
        assert!((n[0] as i64 - n[1] as i64).abs() < 300, "{n:?}");
        // With K=2 over three groups it still gets only a small share of the
        // copies, and every message still has its two copies on two groups.
        let n = counts(&cands, 2, 3000);
        assert!(n[2] > 0 && n[2] < 3000 * 2 / 3 / 4, "{n:?}");
        assert_eq!(n.iter().sum::<usize>(), 6000);
        // Without the weighting the same candidates share evenly.
        let n = counts_with(&cands, 1, 3000, LatencyWeighting::OFF);
        assert!(n.iter().all(|h| (850..=1150).contains(h)), "{n:?}");
    }

    #[test]
    fn equal_latencies_and_noise_share_evenly() {
        let cands = [
            timed(0, "a", 3_000, 1),
            timed(1, "b", 3_000, 1),
            timed(2, "c", 3_000, 1),
        ];
        let n = counts(&cands, 1, 3000);
        assert!(n.iter().all(|h| (850..=1150).contains(h)), "{n:?}");
        // A millisecond apart is noise under the slack: still near even.
        let cands = [timed(0, "a", 1_000, 0), timed(1, "b", 2_000, 0)];
        let n = counts(&cands, 1, 4000);
        assert!(n[1] > 1700, "{n:?}");
    }

    #[test]
    fn a_loaded_backend_gets_less() {
        // Same latency, 9 requests in flight against none.
        let cands = [timed(0, "a", 2_000, 0), timed(1, "b", 2_000, 9)];
        let n = counts(&cands, 1, 4000);
        assert!(n[1] < 4000 / 5, "{n:?}");
        assert!(n[1] > 0, "{n:?}");
    }

    #[test]
    fn unknown_latency_counts_as_the_fastest() {
        let mut fresh = c(2, "c", 0, GIB);
        fresh.latency_us = None;
        let cands = [timed(0, "a", 2_000, 0), timed(1, "b", 2_000, 0), fresh];
        let n = counts(&cands, 1, 3000);
        assert!(n.iter().all(|h| (850..=1150).contains(h)), "{n:?}");
    }

    #[test]
    fn groups_and_priority_beat_speed() {
        // The only other group gets the second copy however slow it is.
        let cands = [
            timed(0, "h1", 1_000, 0),
            timed(1, "h1", 1_000, 0),
            timed(2, "h2", 900_000, 20),
        ];
        let n = counts(&cands, 2, 500);
        assert_eq!(n[2], 500, "{n:?}");
        // A slow backend of higher priority is still preferred.
        let mut slow_first = timed(0, "a", 900_000, 5);
        slow_first.priority = 1;
        let cands = [slow_first, timed(1, "b", 1_000, 0)];
        let n = counts(&cands, 1, 200);
        assert_eq!(n, vec![200, 0]);
    }

    #[test]
    fn the_floor_is_a_knob() {
        let cands = [timed(0, "a", 1_000, 0), timed(1, "b", 10_000_000, 0)];
        let low = LatencyWeighting {
            slack_us: 0,
            factor_min_permille: 0,
        };
        let n = counts_with(&cands, 1, 20_000, low);
        assert!(n[1] < 100, "{n:?}");
        let half = LatencyWeighting {
            slack_us: 0,
            factor_min_permille: 500,
        };
        let n = counts_with(&cands, 1, 3000, half);
        assert!((850..=1150).contains(&n[1]), "{n:?}");
    }
}
