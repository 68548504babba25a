//! Request framing: a guard on HTTP/1 connections that finds requests framed two ways at once
//! (`Content-Length` beside `Transfer-Encoding`) before hyper reads them, and [`check`], which refuses the
//! request heads a proxy could read differently from its upstream.
//!
//! hyper resolves such a request by the RFC's rule (chunked wins, the length is dropped), which keeps our
//! own forwarding unambiguous but forwards a request another hop could have read differently. We refuse
//! them instead: the guard follows the byte stream with the same framing rules hyper applies (head, then
//! a `Content-Length` or chunked body, then the next head), and when a head carries both fields it adds
//! [`AMBIGUOUS_MARK`] to that head so the handler answers 400 without forwarding. HTTP/2 connections and
//! upgraded connections pass through untouched.
//!
//! The guard also tells the connection's [`Activity`] when bytes of a head have arrived but the head is
//! not complete: the head deadline (`connections`) runs from there, since hyper does not see a held-back
//! line.

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderMap, HeaderValue, header};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{connections::Activity, error::Refusal, problem::Code};

/// Header the guard adds to a request head that is framed two ways.
pub const AMBIGUOUS_MARK: &str = "paygate-ambiguous-framing";

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Not yet known whether the connection speaks HTTP/2.
    Detect,
    /// Reading a request head, line by line; lines are passed on as soon as they are complete, so hyper
    /// sees a slow client's bytes (and its header read timeout runs) while the guard reads along.
    Head(HeadScan),
    /// Inside a body of known length: this many bytes remain.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Everything passes unexamined (HTTP/2, upgrades, heads the guard cannot parse: hyper rejects those).
    Passthrough,
}

/// What the lines of a head said so far.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct HeadScan {
    bytes: usize,
    seen_request_line: bool,
    lengths: Vec<Vec<u8>>,
    transfer_encoding: bool,
    chunked: bool,
    upgrade: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// This many data bytes remain, then the CRLF after them.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk, until an empty line.
    Trailers,
}

/// Follows HTTP/1 request framing over a byte stream, marking ambiguous heads.
#[derive(Debug)]
pub struct Framing {
    state: State,
    /// Bytes of an unfinished head or line.
    pending: Vec<u8>,
    max_head: usize,
}

impl Framing {
    /// Returns a scanner that gives up (passes through) on heads longer than `max_head` bytes, which hyper
    /// refuses itself.
    pub fn new(max_head: usize) -> Self {
        Self {
            state: State::Detect,
            pending: Vec::new(),
            max_head,
        }
    }

    /// Returns whether part of a request head has been read but not the whole of it.
    pub fn inside_head(&self) -> bool {
        match &self.state {
            State::Detect => !self.pending.is_empty(),
            State::Head(scan) => scan.bytes > 0,
            State::Body(_) | State::Chunked(_) | State::Passthrough => false,
        }
    }

    /// Consumes `input` and appends what hyper should read to `output`.
    pub fn feed(&mut self, mut input: &[u8], output: &mut VecDeque<u8>) {
        while !input.is_empty() {
            match &mut self.state {
                State::Passthrough => {
                    output.extend(input);
                    return;
                }
                State::Detect => {
                    self.pending.extend_from_slice(input);
                    input = &[];
                    let known = self.pending.len().min(H2_PREFACE.len());
                    if self.pending[..known] != H2_PREFACE[..known] {
                        self.state = State::Head(HeadScan::default());
                        let buffered = std::mem::take(&mut self.pending);
                        self.feed(&buffered, output);
                    } else if self.pending.len() >= H2_PREFACE.len() {
                        self.state = State::Passthrough;
                        output.extend(self.pending.drain(..));
                    }
                }
                State::Head(scan) => {
                    let Some(newline) = input.iter().position(|&byte| byte == b'\n') else {
                        self.pending.extend_from_slice(input);
                        scan.bytes += input.len();
                        if scan.bytes > self.max_head {
                            // hyper refuses heads this long itself (431).
                            self.state = State::Passthrough;
                            output.extend(self.pending.drain(..));
                        }
                        return;
                    };
                    self.pending.extend_from_slice(&input[..=newline]);
                    scan.bytes += newline + 1;
                    input = &input[newline + 1..];
                    let line = std::mem::take(&mut self.pending);
                    let mut scan = std::mem::take(scan);
                    self.state = match read_head_line(&mut scan, &line) {
                        HeadLine::More => {
                            output.extend(&line);
                            State::Head(scan)
                        }
                        HeadLine::End => {
                            if scan.transfer_encoding && !scan.lengths.is_empty() {
                                output.extend(AMBIGUOUS_MARK.as_bytes());
                                output.extend(b": 1\r\n");
                            }
                            output.extend(&line);
                            body_state(&scan)
                        }
                        HeadLine::Unreadable => {
                            output.extend(&line);
                            State::Passthrough
                        }
                    };
                }
                State::Body(remaining) => {
                    let take = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(input.len());
                    output.extend(&input[..take]);
                    input = &input[take..];
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.state = State::Head(HeadScan::default());
                    }
                }
                State::Chunked(chunk) => {
                    let consumed = match chunk {
                        Chunk::Data(remaining) => {
                            let take = usize::try_from(*remaining)
                                .unwrap_or(usize::MAX)
                                .min(input.len());
                            *remaining -= take as u64;
                            if *remaining == 0 {
                                *chunk = Chunk::DataEnd;
                            }
                            take
                        }
                        Chunk::Size | Chunk::DataEnd | Chunk::Trailers => {
                            match input.iter().position(|&byte| byte == b'\n') {
                                None => {
                                    self.pending.extend_from_slice(input);
                                    input.len()
                                }
                                Some(newline) => {
                                    self.pending.extend_from_slice(&input[..=newline]);
                                    let line = std::mem::take(&mut self.pending);
                                    self.state = next_chunk_state(chunk.clone(), &line);
                                    newline + 1
                                }
                            }
                        }
                    };
                    output.extend(&input[..consumed]);
                    input = &input[consumed..];
                }
            }
        }
    }
}

enum HeadLine {
    More,
    End,
    Unreadable,
}

/// Reads one line of a head into `scan`.
fn read_head_line(scan: &mut HeadScan, line: &[u8]) -> HeadLine {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if !scan.seen_request_line {
        if line.is_empty() {
            // Empty lines before a request line are tolerated (RFC 9112 §2.2).
            return HeadLine::More;
        }
        scan.seen_request_line = true;
        scan.upgrade = line.starts_with(b"CONNECT ");
        return HeadLine::More;
    }
    if line.is_empty() {
        return HeadLine::End;
    }
    let Some(colon) = line.iter().position(|&byte| byte == b':') else {
        return HeadLine::Unreadable;
    };
    let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
    if name.eq_ignore_ascii_case(b"content-length") {
        scan.lengths.push(value.to_vec());
    } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
        scan.transfer_encoding = true;
        scan.chunked = value
            .rsplit(|&byte| byte == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
    } else if name.eq_ignore_ascii_case(b"upgrade") {
        scan.upgrade = true;
    }
    HeadLine::More
}

/// Returns the state the body of a request with this head puts the stream in, by hyper's rules.
fn body_state(scan: &HeadScan) -> State {
    if scan.upgrade {
        return State::Passthrough;
    }
    if scan.transfer_encoding {
        // Without `chunked` last hyper refuses the request; nothing further can be framed after it.
        return if scan.chunked {
            State::Chunked(Chunk::Size)
        } else {
            State::Passthrough
        };
    }
    let Some(first) = scan.lengths.first() else {
        return State::Head(HeadScan::default());
    };
    let length = std::str::from_utf8(first)
        .ok()
        .and_then(|text| text.parse::<u64>().ok());
    match length {
        _ if scan.lengths.iter().any(|other| other != first) => State::Passthrough, // hyper: 400
        Some(0) => State::Head(HeadScan::default()),
        Some(length) => State::Body(length),
        None => State::Passthrough, // hyper: 400
    }
}

fn next_chunk_state(chunk: Chunk, line: &[u8]) -> State {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match chunk {
        Chunk::Size => {
            let size = line
                .split(|&byte| byte == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            match std::str::from_utf8(size)
                .ok()
                .and_then(|text| u64::from_str_radix(text, 16).ok())
            {
                Some(0) => State::Chunked(Chunk::Trailers),
                Some(size) => State::Chunked(Chunk::Data(size)),
                None => State::Passthrough, // hyper refuses a bad chunk size
            }
        }
        Chunk::DataEnd => State::Chunked(Chunk::Size),
        Chunk::Trailers if line.is_empty() => State::Head(HeadScan::default()),
        Chunk::Trailers => State::Chunked(Chunk::Trailers),
        Chunk::Data(_) => State::Passthrough,
    }
}

/// An IO wrapper that runs [`Framing`] over what the client sends.
pub struct Guarded<IO> {
    inner: IO,
    framing: Framing,
    ready: VecDeque<u8>,
    activity: Option<std::sync::Arc<Activity>>,
}

impl<IO> Guarded<IO> {
    /// Wraps `inner`, passing through heads longer than `max_head` (hyper refuses them).
    pub fn new(inner: IO, max_head: usize) -> Self {
        Self {
            inner,
            framing: Framing::new(max_head),
            ready: VecDeque::new(),
            activity: None,
        }
    }

    /// Reports to `activity` each time a read leaves a head begun but unfinished.
    pub fn reporting_to(mut self, activity: std::sync::Arc<Activity>) -> Self {
        self.activity = Some(activity);
        self
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.ready.is_empty() {
            let mut scratch = [0_u8; 8192];
            let mut incoming = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut incoming) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) if incoming.filled().is_empty() => {
                    // End of stream: hand hyper whatever an unfinished head held, so it can refuse it.
                    this.ready.extend(this.framing.pending.drain(..));
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    this.framing.feed(incoming.filled(), &mut this.ready);
                    if let Some(activity) = &this.activity
                        && this.framing.inside_head()
                    {
                        activity.head_begun();
                    }
                }
            }
        }
        let (front, back) = this.ready.as_slices();
        let mut copied = front.len().min(buf.remaining());
        buf.put_slice(&front[..copied]);
        if copied == front.len() {
            let more = back.len().min(buf.remaining());
            buf.put_slice(&back[..more]);
            copied += more;
        }
        this.ready.drain(..copied);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Refuses framing a proxy could read differently from the upstream (request smuggling), and transfer
/// codings other than a single `chunked`, which the gateway would otherwise forward decoded as plain
/// chunked, silently dropping the coding.
pub fn check(headers: &HeaderMap) -> Result<(), Refusal> {
    const TWO_WAYS: &str = "Both Content-Length and Transfer-Encoding were sent; send only one.";
    let bad_request = |detail: &str| Err(Refusal::new(Code::BadRequest).with_detail(detail));
    if headers.contains_key(AMBIGUOUS_MARK) {
        return bad_request(TWO_WAYS);
    }
    let lengths: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if !lengths.is_empty() && headers.contains_key(header::TRANSFER_ENCODING) {
        return bad_request(TWO_WAYS);
    }
    if lengths.len() > 1 {
        return bad_request("Content-Length was sent more than once; send it once.");
    }
    if let Some(length) = lengths.first() {
        let valid = length
            .to_str()
            .is_ok_and(|text| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()));
        if !valid {
            return bad_request("Content-Length must be a non-negative integer.");
        }
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let mut codings = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|coding| !coding.is_empty());
        match (codings.next(), codings.next()) {
            (Some(only), None) if only.eq_ignore_ascii_case(b"chunked") => {}
            (None, _) => return bad_request("Transfer-Encoding was sent empty."),
            _ => {
                return Err(Refusal::new(Code::UnsupportedTransferCoding).with_detail(
                    "Only `Transfer-Encoding: chunked` is accepted; send compressed bodies with \
                     Content-Encoding instead.",
                ));
            }
        }
    }
    Ok(())
}

/// Returns the body length the head declares, if it declares one.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes and returns what hyper would read.
    fn scan(input: &[u8], step: usize) -> String {
        let mut framing = Framing::new(64 * 1024);
        let mut output = VecDeque::new();
        for piece in input.chunks(step) {
            framing.feed(piece, &mut output);
        }
        String::from_utf8(output.into_iter().collect()).expect("utf-8")
    }

    const PIPELINE: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 23\r\n\r\nTransfer-Encoding: ab\r\n\
        POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhe\r\n\r\r\n0\r\nTrailer: t\r\n\r\n\
        POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
        GET /d HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn only_the_head_framed_two_ways_is_marked_however_the_bytes_arrive() {
        for step in [1, 2, 3, 7, 64, PIPELINE.len()] {
            let seen = scan(PIPELINE, step);

            assert_eq!(seen.matches(AMBIGUOUS_MARK).count(), 1, "step {step}");
            let marked = seen.find(AMBIGUOUS_MARK).expect("marked");
            assert!(
                marked > seen.find("POST /c").expect("c")
                    && marked < seen.find("3\r\nabc").expect("body")
            );
            assert_eq!(
                seen.len(),
                PIPELINE.len() + AMBIGUOUS_MARK.len() + 5,
                "step {step}"
            );
        }
    }

    #[test]
    fn body_bytes_that_look_like_headers_are_not_heads() {
        let request = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 49\r\n\r\n\
            Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";

        assert!(!scan(request, 5).contains(AMBIGUOUS_MARK));
    }

    #[test]
    fn a_head_is_unfinished_from_its_first_byte_to_its_empty_line() {
        let mut framing = Framing::new(64 * 1024);
        let mut output = VecDeque::new();
        let mut inside = vec![framing.inside_head()];
        for piece in [
            &b"G"[..],
            b"ET / HTTP/1.1\r\nHost: x\r\n",
            b"\r\n",
            b"P",
            b"UT /",
        ] {
            framing.feed(piece, &mut output);
            inside.push(framing.inside_head());
        }

        assert_eq!(inside, [false, true, true, false, true, true]);
    }

    #[test]
    fn http2_passes_through_untouched() {
        let mut input = H2_PREFACE.to_vec();
        input.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00Content-Length: 1\r\nTransfer-Encoding: x\r\n\r\n");

        assert_eq!(scan(&input, 3).as_bytes(), input.as_slice());
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    fn checked(pairs: &[(&str, &str)]) -> Result<(), Code> {
        check(&headers(pairs)).map_err(|refusal| refusal.code())
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert!(checked(&[("content-length", "5"), ("transfer-encoding", "chunked")]).is_err());
        assert!(checked(&[("content-length", "5"), ("content-length", "5")]).is_err());
        assert!(checked(&[("content-length", "+5")]).is_err());
        assert!(checked(&[("content-length", "5")]).is_ok());
        assert!(checked(&[("transfer-encoding", "chunked")]).is_ok());
        assert!(checked(&[("transfer-encoding", " Chunked ")]).is_ok());
    }

    #[test]
    fn a_transfer_coding_other_than_a_single_chunked_is_not_supported() {
        for codings in [
            &[("transfer-encoding", "gzip, chunked")][..],
            &[
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "chunked, chunked")],
        ] {
            assert_eq!(
                checked(codings),
                Err(Code::UnsupportedTransferCoding),
                "{codings:?}"
            );
        }
        assert_eq!(
            checked(&[("transfer-encoding", " , ")]),
            Err(Code::BadRequest)
        );
    }
}
