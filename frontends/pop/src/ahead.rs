//! Fetch-ahead for RETR: which messages one `GETM` brings, and where they
//! wait for their RETR. Pure (no I/O), so the memory bound and the round
//! trips per drain are unit-tested here.
//!
//! A RETR that misses looks at its *window*: the run of listing entries from
//! the one asked for, whoever holds them, of at most `messages_max` messages
//! and `bytes_max` bytes. One `GETM` to the chosen holder fetches every
//! message of the window that holder has and that is not held already. What
//! other backends hold is fetched by the RETR that reaches it, and what was
//! fetched ahead from one backend is kept while another is asked: with
//! messages spread over B backends a drain costs about B `GETM`s per window,
//! not one per message. Everything held lies in the current window, so a
//! session holds at most `bytes_max` bytes, from all backends together.

use powermail_frontend::BackendId;

use crate::listing::Merged;

/// Messages fetched ahead of the client's RETRs: listing index and bytes.
#[derive(Debug, Default)]
pub struct Ahead {
    held: Vec<(usize, Vec<u8>)>,
}

impl Ahead {
    /// Takes the bytes of listing entry `index`, if fetched ahead.
    pub fn take(&mut self, index: usize) -> Option<Vec<u8>> {
        let at = self.held.iter().position(|(i, _)| *i == index)?;
        Some(self.held.swap_remove(at).1)
    }

    /// Keeps what `GETM` fetched ahead for listing entry `index`.
    pub fn hold(&mut self, index: usize, body: Vec<u8>) {
        self.held.push((index, body));
    }

    /// Drops everything outside `window` (listing indexes): messages the
    /// client has passed, or beyond where it now reads.
    pub fn keep_only(&mut self, window: std::ops::Range<usize>) {
        self.held.retain(|(i, _)| window.contains(i));
    }

    /// Whether listing entry `index` is held.
    pub fn holds(&self, index: usize) -> bool {
        self.held.iter().any(|(i, _)| *i == index)
    }

    /// Bytes held.
    pub fn held_bytes(&self) -> usize {
        self.held.iter().map(|(_, b)| b.len()).sum()
    }
}

/// The window of a RETR of `index`: listing indexes `index..end`, at most
/// `messages_max` messages and `bytes_max` bytes, whoever holds them.
/// Empty when `index` alone is over `bytes_max` (it is streamed instead).
pub fn window(
    messages: &[Merged],
    index: usize,
    messages_max: usize,
    bytes_max: u64,
) -> std::ops::Range<usize> {
    let mut bytes = 0u64;
    let mut end = index;
    for m in messages.iter().skip(index).take(messages_max) {
        if bytes + m.size_bytes > bytes_max {
            break;
        }
        bytes += m.size_bytes;
        end += 1;
    }
    index..end
}

/// The listing indexes one `GETM` to `holder` fetches when RETR asks for
/// `index`: `index` first, then the messages of its [`window`] that `holder`
/// also has and that `ahead` does not hold. Empty when `index` is over
/// `bytes_max`.
pub fn fetch_plan(
    messages: &[Merged],
    index: usize,
    holder: BackendId,
    ahead: &Ahead,
    messages_max: usize,
    bytes_max: u64,
) -> Vec<usize> {
    window(messages, index, messages_max, bytes_max)
        .filter(|&i| i == index || (messages[i].holders.contains(&holder) && !ahead.holds(i)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use powermail_proto::MessageId;

    fn listing(holders: &[&[BackendId]], size_bytes: u64) -> Vec<Merged> {
        holders
            .iter()
            .enumerate()
            .map(|(i, h)| Merged {
                msgid: MessageId::parse(&format!("m{i:04}")).expect("id"),
                size_bytes,
                holders: h.to_vec(),
            })
            .collect()
    }

    /// Drains `messages` in order, as a client does (RETR 1, RETR 2, ...),
    /// fetching from each message's first holder; returns the `GETM`s made
    /// and the most bytes held at once.
    fn drain(messages: &[Merged], messages_max: usize, bytes_max: u64) -> (usize, usize) {
        let mut ahead = Ahead::default();
        let (mut getms, mut most_held) = (0, 0);
        for index in 0..messages.len() {
            if let Some(body) = ahead.take(index) {
                assert_eq!(body, vec![index as u8; messages[index].size_bytes as usize]);
                continue;
            }
            let w = window(messages, index, messages_max, bytes_max);
            ahead.keep_only(w.clone());
            let holder = messages[index].holders[0];
            let plan = fetch_plan(messages, index, holder, &ahead, messages_max, bytes_max);
            assert_eq!(
                plan.first(),
                Some(&index),
                "the message asked for comes first"
            );
            getms += 1;
            for &i in &plan[1..] {
                assert!(w.contains(&i) && messages[i].holders.contains(&holder));
                ahead.hold(i, vec![i as u8; messages[i].size_bytes as usize]);
            }
            most_held = most_held.max(ahead.held_bytes() + messages[index].size_bytes as usize);
        }
        assert_eq!(ahead.held_bytes(), 0, "everything fetched was served");
        (getms, most_held)
    }

    #[test]
    fn messages_spread_over_two_backends_cost_two_getms_per_window() {
        // K=1 over two backends: the messages alternate. Before, each miss
        // dropped what the other backend's GETM had brought, so every RETR
        // was a GETM of a whole window.
        let holders: Vec<&[BackendId]> = (0..100)
            .map(|i| if i % 2 == 0 { &[0][..] } else { &[1][..] })
            .collect();
        let messages = listing(&holders, 1000);
        let (getms, most_held) = drain(&messages, 10, 1 << 20);
        assert_eq!(getms, 20, "two per window of ten");
        assert!(most_held <= 10 * 1000);
    }

    #[test]
    fn one_backend_costs_one_getm_per_window() {
        let messages = listing(&[&[0][..]; 100], 1000);
        assert_eq!(
            drain(&messages, 32, 10_000).0,
            10,
            "ten messages fit 10,000 bytes"
        );
    }

    #[test]
    fn held_bytes_never_exceed_the_window_whatever_the_spread() {
        // Three backends, K=1 and K=2 mixed, in a fixed pseudo-random order.
        let choices: [&[BackendId]; 5] = [&[0], &[1], &[2], &[0, 2], &[1, 2]];
        let mut x = 7u32;
        let holders: Vec<&[BackendId]> = (0..500)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                choices[(x >> 16) as usize % choices.len()]
            })
            .collect();
        let messages = listing(&holders, 4096);
        let bytes_max = 64 * 1024;
        let (getms, most_held) = drain(&messages, 32, bytes_max);
        assert!(
            most_held as u64 <= bytes_max,
            "held {most_held} > {bytes_max}"
        );
        assert!(getms <= 500 / 16 * 3 + 3, "{getms} GETMs for 500 messages");
    }

    #[test]
    fn a_client_going_back_drops_what_lies_beyond_its_new_window() {
        let messages = listing(&[&[0][..]; 40], 1000);
        let mut ahead = Ahead::default();
        for i in 21..30 {
            ahead.hold(i, vec![0; 1000]);
        }
        let w = window(&messages, 15, 10, 1 << 20);
        assert_eq!(w, 15..25);
        ahead.keep_only(w);
        assert_eq!(ahead.held_bytes(), 4 * 1000, "21..25 kept");
        assert_eq!(
            fetch_plan(&messages, 15, 0, &ahead, 10, 1 << 20),
            vec![15, 16, 17, 18, 19, 20]
        );
    }

    #[test]
    fn a_message_over_the_window_is_not_fetched_ahead() {
        let messages = listing(&[&[0][..]; 3], 5000);
        assert!(window(&messages, 0, 32, 4999).is_empty());
        assert!(fetch_plan(&messages, 0, 0, &Ahead::default(), 32, 4999).is_empty());
        assert_eq!(window(&messages, 1, 32, 5000), 1..2);
    }
}
