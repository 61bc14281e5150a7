//! Makes gRPC clients that send a socket path as `:authority` work.
//!
//! gRPC C-core (so grpc-python and py-spiffe) sends the percent-encoded
//! socket path as the HTTP/2 `:authority` of a Unix socket call
//! (`tmp%2Fagent.sock`), grpc-java and others the raw path. Neither is a
//! valid authority, and the HTTP/2 server under tonic (h2) answers such a
//! request with `RST_STREAM(PROTOCOL_ERROR)`. The Workload API has no use for
//! the authority (callers are identified by the kernel), so a connection
//! whose first request has an invalid one is rewritten on the way in: each
//! request's header block is decoded with the client's compression state and
//! re-encoded as plain literals, with an invalid `:authority` replaced by
//! `localhost`. Connections whose first request is valid (go-spiffe, the
//! Rust `spiffe` crate, tonic) are passed through untouched after it.

mod hpack;
mod huffman;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

use self::hpack::{Decoder, Field};

/// The connection preface every HTTP/2 client sends first.
const PREFACE_LEN: usize = 24;

/// The size of an HTTP/2 frame header.
const FRAME_HEADER_LEN: usize = 9;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The largest frame every HTTP/2 peer accepts (the smallest value
/// SETTINGS_MAX_FRAME_SIZE may have).
const MAX_FRAME_LEN: usize = 16_384;

/// Header blocks (compressed) and header lists (decoded) larger than this
/// are not rewritten; the server refuses them on its own.
const MAX_BLOCK_LEN: usize = 64 * 1024;

/// What replaces an invalid `:authority`.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// A header block being collected from a HEADERS frame and its
/// CONTINUATION frames.
#[derive(Debug)]
struct Block {
    stream_id: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, to forward unchanged.
    raw: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Until the first header block: forward frames, decode the block.
    Inspect,
    /// Every header block is re-encoded.
    Rewrite,
    /// Everything is forwarded as is.
    PassThrough,
}

/// The client-to-server half of a connection, as a transformation of bytes
/// (no I/O): see the module documentation.
#[derive(Debug)]
struct Rewriter {
    preface_left: usize,
    mode: Mode,
    /// Bytes of the current frame's payload still to forward unchanged.
    forward_left: usize,
    block: Option<Block>,
    decoder: Decoder,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self {
            preface_left: PREFACE_LEN,
            mode: Mode::Inspect,
            forward_left: 0,
            block: None,
            decoder: Decoder::default(),
        }
    }
}

impl Rewriter {
    /// Moves what it can from `input` to `output`; returns how many bytes of
    /// `input` it used. The rest (an incomplete header frame) waits for
    /// more input.
    fn process(&mut self, input: &[u8], output: &mut Vec<u8>) -> usize {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            if rest.is_empty() {
                return used;
            }
            if self.mode == Mode::PassThrough {
                output.extend_from_slice(rest);
                return input.len();
            }
            if self.preface_left > 0 || self.forward_left > 0 {
                let n = if self.preface_left > 0 {
                    let n = self.preface_left.min(rest.len());
                    self.preface_left -= n;
                    n
                } else {
                    let n = self.forward_left.min(rest.len());
                    self.forward_left -= n;
                    n
                };
                output.extend_from_slice(&rest[..n]);
                used += n;
                continue;
            }

            let Some(header) = rest.get(..FRAME_HEADER_LEN) else {
                return used;
            };
            let len =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let kind = header[3];
            let collecting = self.block.is_some();
            if collecting && kind != CONTINUATION {
                // Another frame inside a header block is a protocol error
                // the server reports; give it the bytes as they came.
                self.give_up(output);
                continue;
            }
            if !collecting && kind != HEADERS {
                output.extend_from_slice(header);
                used += FRAME_HEADER_LEN;
                self.forward_left = len;
                continue;
            }
            let collected = self.block.as_ref().map_or(0, |b| b.raw.len());
            if len > MAX_FRAME_LEN.max(MAX_BLOCK_LEN) || collected + len > MAX_BLOCK_LEN {
                self.give_up(output);
                continue;
            }
            let Some(frame) = rest.get(..FRAME_HEADER_LEN + len) else {
                return used;
            };
            used += frame.len();
            if let Err(frame) = self.collect(frame) {
                self.give_up(output);
                output.extend_from_slice(frame);
                continue;
            }
            if frame[4] & END_HEADERS != 0 {
                self.finish_block(output);
            }
        }
    }

    /// Adds a HEADERS or CONTINUATION frame to the block; returns the frame
    /// back if it is malformed.
    fn collect<'a>(&mut self, frame: &'a [u8]) -> Result<(), &'a [u8]> {
        let (header, payload) = frame.split_at(FRAME_HEADER_LEN);
        let flags = header[4];
        let mut stream_id = [0u8; 4];
        stream_id.copy_from_slice(&header[5..9]);

        if header[3] == CONTINUATION {
            let Some(block) = self.block.as_mut().filter(|b| b.stream_id == stream_id) else {
                return Err(frame);
            };
            block.fragment.extend_from_slice(payload);
            block.raw.extend_from_slice(frame);
            return Ok(());
        }

        let mut payload = payload;
        if flags & PADDED != 0 {
            let Some((&pad, rest)) = payload.split_first() else {
                return Err(frame);
            };
            let Some(end) = rest.len().checked_sub(usize::from(pad)) else {
                return Err(frame);
            };
            payload = &rest[..end];
        }
        let priority = if flags & PRIORITY != 0 {
            let Some(bytes) = payload.get(..5) else {
                return Err(frame);
            };
            let mut priority = [0u8; 5];
            priority.copy_from_slice(bytes);
            payload = &payload[5..];
            Some(priority)
        } else {
            None
        };
        self.block = Some(Block {
            stream_id,
            end_stream: flags & END_STREAM != 0,
            priority,
            fragment: payload.to_vec(),
            raw: frame.to_vec(),
        });
        Ok(())
    }

    fn finish_block(&mut self, output: &mut Vec<u8>) {
        let Some(block) = self.block.take() else {
            return;
        };
        let mut fields = match self.decoder.decode(&block.fragment, MAX_BLOCK_LEN) {
            Ok(fields) => fields,
            Err(e) => {
                // The server's own decoder will fail the same way.
                tracing::debug!(error = %e, "undecodable header block passed through");
                output.extend_from_slice(&block.raw);
                self.mode = Mode::PassThrough;
                return;
            }
        };
        let fixed = fix_authority(&mut fields);
        if self.mode == Mode::Inspect && !fixed {
            output.extend_from_slice(&block.raw);
            self.mode = Mode::PassThrough;
            return;
        }
        self.mode = Mode::Rewrite;
        write_block(&block, &fields, output);
    }

    /// Stops rewriting: forwards any collected frames and everything after.
    fn give_up(&mut self, output: &mut Vec<u8>) {
        if let Some(block) = self.block.take() {
            output.extend_from_slice(&block.raw);
        }
        self.mode = Mode::PassThrough;
    }

    fn passes_through(&self) -> bool {
        self.mode == Mode::PassThrough
    }
}

/// Replaces an `:authority` that is not a valid URI authority; returns
/// whether it did.
fn fix_authority(fields: &mut [Field]) -> bool {
    let mut fixed = false;
    for (name, value) in fields.iter_mut() {
        if name.as_slice() == b":authority"
            && tonic::codegen::http::uri::Authority::try_from(value.as_slice()).is_err()
        {
            *value = LOCAL_AUTHORITY.to_vec();
            fixed = true;
        }
    }
    fixed
}

/// Writes a header block as a HEADERS frame and as many CONTINUATION
/// frames as its size needs.
fn write_block(block: &Block, fields: &[Field], output: &mut Vec<u8>) {
    let mut encoded = Vec::new();
    if let Some(priority) = &block.priority {
        encoded.extend_from_slice(priority);
    }
    hpack::encode(fields, &mut encoded);

    let mut chunks = encoded.chunks(MAX_FRAME_LEN).peekable();
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let mut flags = 0;
        if first {
            if block.end_stream {
                flags |= END_STREAM;
            }
            if block.priority.is_some() {
                flags |= PRIORITY;
            }
        }
        if chunks.peek().is_none() {
            flags |= END_HEADERS;
        }
        let kind = if first { HEADERS } else { CONTINUATION };
        let len = chunk.len();
        // At most MAX_FRAME_LEN, so three bytes.
        output.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        output.extend_from_slice(&block.stream_id);
        output.extend_from_slice(chunk);
        first = false;
    }
}

/// A Unix socket connection to the Workload API whose requests are passed
/// through [`Rewriter`]; writes go straight to the socket.
#[derive(Debug)]
pub(crate) struct FixAuthority {
    inner: UnixStream,
    rewriter: Rewriter,
    /// Received, not yet processed.
    input: Vec<u8>,
    /// Processed, not yet read; `output_pos` is how much has been read.
    output: Vec<u8>,
    output_pos: usize,
}

impl FixAuthority {
    /// Wraps an accepted connection.
    pub(crate) fn new(inner: UnixStream) -> Self {
        Self {
            inner,
            rewriter: Rewriter::default(),
            input: Vec::new(),
            output: Vec::new(),
            output_pos: 0,
        }
    }
}

impl Connected for FixAuthority {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for FixAuthority {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.output_pos < this.output.len() {
                let ready = &this.output[this.output_pos..];
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.output_pos += n;
                if this.output_pos == this.output.len() {
                    this.output.clear();
                    this.output_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.passes_through() && this.input.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if !this.input.is_empty() {
                let used = this.rewriter.process(&this.input, &mut this.output);
                this.input.drain(..used);
                if !this.output.is_empty() {
                    continue;
                }
            }

            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // End of stream: hand over an incomplete frame as it is.
                if this.input.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.output.append(&mut this.input);
                continue;
            }
            this.input.extend_from_slice(read.filled());
        }
    }
}

impl AsyncWrite for FixAuthority {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[0x00, 0x03, 0x00, 0x00, 0x00, 0x64])
    }

    fn data(stream: u32) -> Vec<u8> {
        frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 0])
    }

    fn fields(pairs: &[(&str, &str)]) -> Vec<Field> {
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    /// The first request grpc-python 1.85 sends over `unix:/tmp/cap.sock`
    /// (captured): literal with incremental indexing for `:path`,
    /// `:authority` and the rest.
    fn grpc_python_request() -> Vec<u8> {
        let mut block = vec![0x83, 0x86];
        for (name, value) in [
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            (":authority", "tmp%2Fcap.sock"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("workload.spiffe.io", "true"),
        ] {
            block.push(0x40);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        frame(HEADERS, END_HEADERS, 1, &block)
    }

    /// Runs the rewriter over `input` fed in pieces of `step` bytes, and
    /// returns what it outputs.
    fn run(rewriter: &mut Rewriter, input: &[u8], step: usize) -> Vec<u8> {
        let mut output = Vec::new();
        let mut pending = Vec::new();
        for piece in input.chunks(step) {
            pending.extend_from_slice(piece);
            let used = rewriter.process(&pending, &mut output);
            pending.drain(..used);
        }
        assert!(pending.is_empty(), "{} bytes left", pending.len());
        output
    }

    /// Splits frames after the preface into (kind, flags, stream, payload).
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut rest = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            out.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        out
    }

    #[test]
    fn a_valid_first_request_passes_everything_through() {
        let mut block = Vec::new();
        hpack::encode(
            &fields(&[
                (":method", "POST"),
                (":authority", "localhost"),
                (":path", "/x"),
            ]),
            &mut block,
        );
        let input = [
            PREFACE.to_vec(),
            settings(),
            frame(HEADERS, END_HEADERS, 1, &block),
            data(1),
            frame(HEADERS, END_HEADERS, 3, &[0xbe]),
        ]
        .concat();
        for step in [1, 7, input.len()] {
            let mut rewriter = Rewriter::default();
            assert_eq!(run(&mut rewriter, &input, step), input, "step {step}");
            assert!(rewriter.passes_through());
        }
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_on_every_request() {
        // The second request refers to the first one's table entries.
        let second = frame(
            HEADERS,
            END_HEADERS,
            3,
            &[0x83, 0x86, 0xc2, 0xc1, 0xc0, 0xbf, 0xbe],
        );
        let input = [
            PREFACE.to_vec(),
            settings(),
            grpc_python_request(),
            data(1),
            second,
            data(3),
        ]
        .concat();
        for step in [1, 5, input.len()] {
            let mut rewriter = Rewriter::default();
            let output = run(&mut rewriter, &input, step);
            assert!(output.starts_with(PREFACE));
            let frames = frames(&output);
            assert_eq!(frames.len(), 5, "step {step}");
            assert_eq!(frames[0].0, 0x4);
            let expected = fields(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("workload.spiffe.io", "true"),
            ]);
            for (i, stream) in [(1, 1), (3, 3)] {
                let (kind, flags, id, payload) = &frames[i];
                assert_eq!((*kind, *flags, *id), (HEADERS, END_HEADERS, stream));
                let decoded = Decoder::default().decode(payload, 1 << 16).unwrap();
                assert_eq!(decoded, expected, "request on stream {stream}");
            }
            assert_eq!(frames[2], (0x0, END_STREAM, 1, vec![0, 0, 0, 0, 0]));
        }
    }

    #[test]
    fn continuation_padding_and_priority_are_handled() {
        let mut block = Vec::new();
        hpack::encode(
            &fields(&[
                (":method", "POST"),
                (":authority", "/run/sigil/api.sock"),
                ("x-big", &"b".repeat(20_000)),
            ]),
            &mut block,
        );
        let (a, b) = block.split_at(100);
        let mut headers = vec![3]; // pad length
        headers.extend_from_slice(&[0, 0, 0, 0, 15]); // priority
        headers.extend_from_slice(a);
        headers.extend_from_slice(&[0, 0, 0]);
        let input = [
            PREFACE.to_vec(),
            frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &headers),
            frame(CONTINUATION, END_HEADERS, 1, b),
        ]
        .concat();
        let output = run(&mut Rewriter::default(), &input, 4096);
        let frames = frames(&output);
        assert_eq!(frames.len(), 2, "the block is re-split at 16 KiB");
        assert_eq!(frames[0].0, HEADERS);
        assert_eq!(frames[0].1, PRIORITY | END_STREAM);
        assert_eq!(frames[0].3.len(), MAX_FRAME_LEN);
        assert_eq!(frames[1].0, CONTINUATION);
        assert_eq!(frames[1].1, END_HEADERS);
        let whole = [&frames[0].3[5..], &frames[1].3[..]].concat();
        let decoded = Decoder::default().decode(&whole, 1 << 16).unwrap();
        assert_eq!(decoded[1], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(decoded[2].1.len(), 20_000);
    }

    #[test]
    fn garbage_is_passed_through_for_the_server_to_refuse() {
        let input = [
            PREFACE.to_vec(),
            frame(HEADERS, END_HEADERS, 1, &[0x80]), // index 0
            data(1),
        ]
        .concat();
        let mut rewriter = Rewriter::default();
        assert_eq!(run(&mut rewriter, &input, 3), input);
        assert!(rewriter.passes_through());
    }
}
