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
//!    slowly and backends with equal space share the load equally.
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
}

/// Picks up to `k` distinct candidates, in the order of preference above.
/// Returns their `id`s, first choice first.
pub fn select<R: Rng + ?Sized>(candidates: &[Candidate<'_>], k: usize, rng: &mut R) -> Vec<usize> {
    let mut remaining: Vec<Candidate<'_>> = candidates.to_vec();
    let mut used_groups: Vec<&str> = Vec::with_capacity(k);
    let mut chosen = Vec::with_capacity(k.min(candidates.len()));
    while chosen.len() < k && !remaining.is_empty() {
        let key = |c: &Candidate<'_>| (!used_groups.contains(&c.group), c.priority);
        let best = remaining.iter().map(key).max().expect("not empty");
        let tier: Vec<usize> = (0..remaining.len())
            .filter(|&i| key(&remaining[i]) == best)
            .collect();
        let pick = tier[weighted_index(&tier, &remaining, rng)];
        let c = remaining.swap_remove(pick);
        used_groups.push(c.group);
        chosen.push(c.id);
    }
    debug_assert!(chosen.len() <= k);
    chosen
}

/// An index into `tier`, drawn with probability proportional to free space
/// (in MiB, plus one so that a full but writable backend can still be drawn).
fn weighted_index<R: Rng + ?Sized>(tier: &[usize], all: &[Candidate<'_>], rng: &mut R) -> usize {
    let weight = |i: usize| (all[i].free_bytes >> 20) + 1;
    let total: u64 = tier.iter().map(|&i| weight(i)).sum();
    let mut x = rng.gen_range(0..total);
    for (n, &i) in tier.iter().enumerate() {
        let w = weight(i);
        if x < w {
            return n;
        }
        x -= w;
    }
    unreachable!("x < total")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const GIB: u64 = 1 << 30;

    fn c(id: usize, group: &'static str, priority: i32, free_bytes: u64) -> Candidate<'static> {
        Candidate {
            id,
            group,
            priority,
            free_bytes,
        }
    }

    fn counts(cands: &[Candidate<'_>], k: usize, runs: usize) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut n = vec![0; cands.len()];
        for _ in 0..runs {
            let got = select(cands, k, &mut rng);
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
        assert_eq!(select(&cands, 2, &mut rng).len(), 2);
        assert_eq!(select(&cands, 5, &mut rng).len(), 3);
        assert!(select(&cands, 0, &mut rng).is_empty());
        assert!(select(&[], 2, &mut rng).is_empty());
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
}
