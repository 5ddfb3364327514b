//! Copy buffers, reused per thread: taking and giving back is a push or
//! pop on a thread-local list, never an allocation in steady state.

use super::BUFFER_BYTES;
use std::cell::RefCell;

/// Buffers kept per thread when idle; beyond, they are freed (1 MiB).
const KEEP: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

pub fn take() -> Vec<u8> {
    FREE.with(|f| f.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUFFER_BYTES])
}

pub fn give(buf: Vec<u8>) {
    debug_assert_eq!(buf.len(), BUFFER_BYTES, "only copy buffers come back");
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        if f.len() < KEEP {
            f.push(buf);
        }
    });
}
