//! Log lines for failures that repeat (a backend down, refused requests during an outage): the first is
//! written at once, the rest are counted and summarised once per interval, so an outage at thousands of
//! requests a second writes a handful of lines, not thousands (DESIGN §7). Every service uses it, so the
//! lines look alike: the event's message, with `suppressed` = how many like it went unwritten since.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// A budget of one log line per interval for one kind of event.
pub struct LogLimit {
    interval: Duration,
    state: Mutex<State>,
}

struct State {
    last_written: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// Returns a limit of one line per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(State {
                last_written: None,
                suppressed: 0,
            }),
        }
    }

    /// Counts one event. Returns `Some(n)` when a line should be written now, `n` being how many events
    /// went unwritten since the last line; `None` when this one is only counted.
    pub fn event(&self) -> Option<u64> {
        self.event_at(Instant::now())
    }

    fn event_at(&self, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match state.last_written {
            Some(last) if now.duration_since(last) < self.interval => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last_written = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

/// The interval repeated-failure lines use.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_is_written_and_the_rest_counted_until_the_interval_passes() {
        let limit = LogLimit::new(Duration::from_secs(5));
        let start = Instant::now();

        let first = limit.event_at(start);
        let burst: Vec<Option<u64>> = (0..99)
            .map(|_| limit.event_at(start + Duration::from_secs(1)))
            .collect();
        let after = limit.event_at(start + Duration::from_secs(6));

        assert_eq!(first, Some(0));
        assert!(burst.iter().all(Option::is_none));
        assert_eq!(after, Some(99));
    }
}
