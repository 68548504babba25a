//! Bounds on client connections: the head and idle deadlines of each connection, the number open at
//! once, and an accept loop that neither spins nor floods the log when the process runs out of files.
//!
//! hyper's own header timer cannot do the first job here: the framing guard holds back an unfinished
//! head line (so hyper never sees a slowly sent head begin), hyper-util's HTTP/1-or-h2 detection has no
//! timer at all, and hyper's timer also runs while a kept-alive connection waits, which would make the
//! idle timeout no longer than the head timeout. So each connection's future runs under
//! [`enforce_deadlines`], fed by the guard (a head has begun) and by the service (a request started or
//! finished).

use std::{
    fmt::Display,
    io,
    num::NonZeroUsize,
    pin::{Pin, pin},
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use hyper::body::{Body, Frame, SizeHint};
use tokio::{sync::Notify, time::Instant};

/// How many open files to leave for everything but client connections (upstream and backend
/// connections, the listeners, logs), at most.
const RESERVED_FILES: u64 = 256;
/// The connection limit when the open-files limit is high or unknown.
const MAX_CONNECTIONS_CEILING: u64 = 10_000;

/// Why a connection was closed by the gateway rather than by the client or by hyper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A request head (or HTTP/2's preface and first request) did not arrive in time.
    Head,
    /// No request was in progress for the idle timeout.
    Idle,
}

impl Expiry {
    /// Returns the reason as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Head => "head_timeout",
            Self::Idle => "idle_timeout",
        }
    }
}

/// What a connection is doing, as far as its deadlines are concerned. Shared by the framing guard, the
/// service and the connection's task.
#[derive(Debug)]
pub struct Activity {
    head_timeout: Duration,
    idle_timeout: Duration,
    state: Mutex<ActivityState>,
    /// Wakes the connection's task when its deadline may have moved earlier.
    changed: Notify,
}

#[derive(Debug)]
struct ActivityState {
    in_flight: usize,
    /// When the head being awaited began; `None` while no byte of the next head has arrived.
    head_began: Option<Instant>,
    idle_since: Instant,
}

impl Activity {
    /// Returns the activity of a connection accepted now: its first head is due `head_timeout` from now,
    /// whether or not the client sends anything.
    pub fn new(head_timeout: Duration, idle_timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            head_timeout,
            idle_timeout,
            state: Mutex::new(ActivityState {
                in_flight: 0,
                head_began: Some(now),
                idle_since: now,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ActivityState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes that bytes of a request head have arrived; the head is due `head_timeout` after the first.
    pub fn head_begun(&self) {
        let mut state = self.lock();
        if state.head_began.is_none() {
            state.head_began = Some(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    /// Notes that a request reached the service; no deadline runs until it and every other request in
    /// progress have finished (their bodies may take as long as they take).
    pub fn request_started(self: &Arc<Self>) -> RequestInProgress {
        let mut state = self.lock();
        state.in_flight += 1;
        state.head_began = None;
        RequestInProgress {
            activity: self.clone(),
        }
    }

    fn request_finished(&self) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            let now = Instant::now();
            state.idle_since = now;
            // Bytes of a pipelined head that came in meanwhile: its time starts now.
            if state.head_began.is_some() {
                state.head_began = Some(now);
            }
        }
        drop(state);
        self.changed.notify_one();
    }

    /// Returns when the connection is to be closed and why; `None` while a request is in progress.
    pub fn deadline(&self) -> Option<(Instant, Expiry)> {
        let state = self.lock();
        if state.in_flight > 0 {
            return None;
        }
        Some(match state.head_began {
            Some(began) => (began + self.head_timeout, Expiry::Head),
            None => (state.idle_since + self.idle_timeout, Expiry::Idle),
        })
    }
}

/// A request in progress on a connection; dropping it (with the response body) ends the request.
#[derive(Debug)]
pub struct RequestInProgress {
    activity: Arc<Activity>,
}

impl Drop for RequestInProgress {
    fn drop(&mut self) {
        self.activity.request_finished();
    }
}

/// A response body that keeps its request in progress until hyper has sent (or dropped) it.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    _request: RequestInProgress,
}

impl<B> TrackedBody<B> {
    /// Wraps `inner`, ending `request` when the body is dropped.
    pub fn new(inner: B, request: RequestInProgress) -> Self {
        Self {
            inner,
            _request: request,
        }
    }
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a connection under [`enforce_deadlines`] ended.
#[derive(Debug)]
pub enum Ending<E> {
    /// The connection finished by itself.
    Finished(Result<(), E>),
    /// A deadline passed; the connection was dropped, which closes its socket.
    Expired(Expiry),
}

/// Runs `connection` until it finishes or the deadline `activity` sets passes.
pub async fn enforce_deadlines<E>(
    connection: impl Future<Output = Result<(), E>>,
    activity: &Activity,
) -> Ending<E> {
    let mut connection = pin!(connection);
    loop {
        let deadline = activity.deadline();
        let expired = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            result = &mut connection => return Ending::Finished(result),
            () = activity.changed.notified() => {}
            () = expired => {
                // The deadline may have moved since it was read (a request started meanwhile).
                if let Some((at, expiry)) = activity.deadline()
                    && at <= Instant::now()
                {
                    return Ending::Expired(expiry);
                }
            }
        }
    }
}

/// Returns the connection limit to use when the routes file sets none: `soft_limit` (the process's
/// open-files limit) less a reserve for everything else the gateway has open, at most 10,000.
pub fn default_max_connections(soft_limit: Option<u64>) -> NonZeroUsize {
    let limit = match soft_limit {
        Some(files) => files
            .saturating_sub(RESERVED_FILES.min(files / 4))
            .min(MAX_CONNECTIONS_CEILING),
        None => MAX_CONNECTIONS_CEILING,
    };
    NonZeroUsize::new(usize::try_from(limit).unwrap_or(usize::MAX)).unwrap_or(NonZeroUsize::MIN)
}

/// Returns the process's soft limit on open files, from `/proc/self/limits` (Linux); `None` where that
/// file does not exist or says `unlimited`.
pub fn open_files_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files_soft_limit(&limits)
}

fn parse_open_files_soft_limit(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Returns whether an accept error concerns only the connection being accepted (the client gave up),
/// so the next accept may follow at once; any other error (out of files, out of memory) lasts a while.
pub fn is_per_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// A warning that can repeat many times a second: logged when it first happens, then at most once per
/// interval with the number of times it happened since the last line.
#[derive(Debug)]
pub struct RepeatedWarning {
    message: &'static str,
    interval: Duration,
    last_logged: Option<Instant>,
    unlogged: u64,
    detail: String,
}

impl RepeatedWarning {
    /// Returns a warning logged as `message`, at most once per `interval`.
    pub fn new(message: &'static str, interval: Duration) -> Self {
        Self {
            message,
            interval,
            last_logged: None,
            unlogged: 0,
            detail: String::new(),
        }
    }

    /// Counts one occurrence; logs and returns the count since the last line when a line is due.
    pub fn record(&mut self, detail: impl Display) -> Option<u64> {
        self.unlogged += 1;
        if self.due() {
            self.detail = detail.to_string();
            return self.log();
        }
        None
    }

    /// Logs the occurrences not logged yet when a line is due; called periodically, so the last ones
    /// of a burst are not left out.
    pub fn flush(&mut self) -> Option<u64> {
        if self.unlogged > 0 && self.due() {
            return self.log();
        }
        None
    }

    fn due(&self) -> bool {
        self.last_logged
            .is_none_or(|logged| logged.elapsed() >= self.interval)
    }

    fn log(&mut self) -> Option<u64> {
        let times = std::mem::take(&mut self.unlogged);
        let interval_s = self.interval.as_secs_f64();
        tracing::warn!(
            times,
            interval_s,
            latest = %self.detail,
            "{}: {times} time(s) since the last report, latest: {}",
            self.message,
            self.detail
        );
        self.last_logged = Some(Instant::now());
        Some(times)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_owes_its_head_from_its_first_moment() {
        let accepted = Instant::now();
        let activity = Activity::new(HEAD, IDLE);

        tokio::time::advance(Duration::from_secs(3)).await;
        activity.head_begun();

        assert_eq!(activity.deadline(), Some((accepted + HEAD, Expiry::Head)));
    }

    #[tokio::test(start_paused = true)]
    async fn no_deadline_runs_while_a_request_is_in_progress() {
        let activity = Arc::new(Activity::new(HEAD, IDLE));

        let first = activity.request_started();
        let second = activity.request_started();
        drop(first);

        assert_eq!(activity.deadline(), None);
        drop(second);
        assert_eq!(activity.deadline().map(|(_, why)| why), Some(Expiry::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_is_idle_until_its_next_head_begins() {
        let activity = Arc::new(Activity::new(HEAD, IDLE));
        drop(activity.request_started());
        let finished = Instant::now();

        assert_eq!(activity.deadline(), Some((finished + IDLE, Expiry::Idle)));
        tokio::time::advance(Duration::from_secs(20)).await;
        activity.head_begun();
        assert_eq!(
            activity.deadline(),
            Some((finished + Duration::from_secs(20) + HEAD, Expiry::Head))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_past_its_deadline_is_ended_and_one_that_finishes_is_not() {
        let (stalled, finishing) = (Activity::new(HEAD, IDLE), Activity::new(HEAD, IDLE));

        let ending = enforce_deadlines(std::future::pending::<Result<(), ()>>(), &stalled).await;
        let finished = enforce_deadlines(async { Ok::<(), ()>(()) }, &finishing).await;

        assert!(matches!(ending, Ending::Expired(Expiry::Head)));
        assert!(matches!(finished, Ending::Finished(Ok(()))));
    }

    #[test]
    fn the_default_connection_limit_leaves_files_for_the_rest() {
        let limit = |files| default_max_connections(files).get();

        assert_eq!(limit(Some(1_048_576)), 10_000);
        assert_eq!(limit(Some(1024)), 768);
        assert_eq!(limit(Some(64)), 48);
        assert_eq!(limit(Some(0)), 1);
        assert_eq!(limit(None), 10_000);
    }

    #[test]
    fn the_soft_open_files_limit_is_read_from_proc() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
            Max processes             63704                63704                processes \n\
            Max open files            1024                 524288               files     \n";

        assert_eq!(parse_open_files_soft_limit(limits), Some(1024));
        assert_eq!(
            parse_open_files_soft_limit(
                "Max open files            unlimited            unlimited            files"
            ),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_warning_is_logged_once_per_interval_with_its_count() {
        let mut warning = RepeatedWarning::new("accept failed", Duration::from_secs(5));

        let first = warning.record("too many open files");
        let quiet: Vec<_> = (0..99)
            .map(|_| warning.record("too many open files"))
            .collect();
        let early = warning.flush();
        tokio::time::advance(Duration::from_secs(5)).await;
        let summary = warning.flush();

        assert_eq!(first, Some(1));
        assert!(quiet.iter().all(Option::is_none));
        assert_eq!(early, None);
        assert_eq!(summary, Some(99));
    }
}
