//! Received HTTP/2 DATA frames held by a proxy until it can pass them on.
//!
//! Frames wait in h2 until they are read, and h2 counts the small ones (under 256 bytes) a
//! connection holds unread against a budget: past it, it closes the connection — every stream
//! on it — with GOAWAY `ENHANCE_YOUR_CALM` (a guard against floods of tiny frames). A proxy
//! whose way onward is blocked (a full socket, an upstream without window, an upstream not yet
//! connected) must not leave a peer's small frames piling up in h2: it takes them out into a
//! backlog, copying small ones together, and releases their flow-control capacity only as it
//! passes them on — so flow control, not the backlog, bounds what is held (a stream window).

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

/// Frames taken from h2 before they could be passed on, in order. Frames under
/// [`COPY_BELOW`] are copied together: each one h2 delivers is a view of h2's read buffer, and
/// a pile of small views would keep many such buffers alive for a few bytes each.
#[derive(Debug, Default)]
pub struct Backlog {
    chunks: VecDeque<Bytes>,
    /// The newest small frames, copied together; after every entry of `chunks`.
    small: BytesMut,
}

/// A TLS record's worth: larger frames are kept as they are.
pub const COPY_BELOW: usize = 16 * 1024;

impl Backlog {
    pub fn push(&mut self, data: Bytes) {
        if data.len() < COPY_BELOW {
            self.small.extend_from_slice(&data);
        } else {
            self.seal_small();
            self.chunks.push_back(data);
        }
    }

    fn seal_small(&mut self) {
        if !self.small.is_empty() {
            self.chunks.push_back(self.small.split().freeze());
        }
    }

    /// The oldest bytes held, as one chunk.
    pub fn pop(&mut self) -> Option<Bytes> {
        self.chunks.pop_front().or_else(|| (!self.small.is_empty()).then(|| self.small.split().freeze()))
    }

    /// Puts the rest of a chunk a reader did not take back in front.
    pub fn push_front(&mut self, rest: Bytes) {
        if !rest.is_empty() {
            self.chunks.push_front(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_frames_are_copied_together_and_large_ones_kept_in_order() {
        let mut backlog = Backlog::default();
        backlog.push(Bytes::from_static(b"ab"));
        backlog.push(Bytes::from_static(b"c"));
        let large = Bytes::from(vec![b'x'; COPY_BELOW]);
        backlog.push(large.clone());
        backlog.push(Bytes::from_static(b"d"));
        assert_eq!(backlog.pop().unwrap(), "abc");
        let mut got = backlog.pop().unwrap();
        assert_eq!(got.as_ptr(), large.as_ptr(), "a large frame is not copied");
        let rest = got.split_off(10);
        backlog.push_front(rest);
        assert_eq!(backlog.pop().unwrap().len(), COPY_BELOW - 10);
        assert_eq!(backlog.pop().unwrap(), "d");
        assert!(backlog.pop().is_none());
    }
}
