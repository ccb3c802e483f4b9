//! Host buffers given back after a training step's backward and handed out again in the next
//! step, for outputs that a kernel overwrites whole. A new buffer must be zero-filled before a
//! safe `&mut [f32]` can point at it; a ViT block's activations and their gradients were 34 MB of
//! zero-fills per DeiT-Tiny batch-8 block (6 % of the step's CPU samples, in `memset`). A
//! reused buffer holds its last use's values instead, which the kernel overwrites.
use super::elementwise::zeros;
use crate::base::SpinDtype;
use std::any::Any;
use std::sync::Mutex;

/// The most bytes kept: beyond it, buffers given back are freed.
pub const MAX_KEPT_BYTES: usize = 1 << 30;

struct Kept {
    buffers: Vec<Box<dyn Any + Send>>,
    bytes: usize,
}

static KEPT: Mutex<Kept> = Mutex::new(Kept {
    buffers: Vec::new(),
    bytes: 0,
});

/// The kept buffers (a panic elsewhere while holding the lock leaves them usable).
fn kept() -> std::sync::MutexGuard<'static, Kept> {
    KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `len` values for an output that is overwritten whole before it is read: a buffer of that
/// length given back earlier (holding its last values), or zeros. Under `cfg(test)` every value
/// is NaN instead, so that a kernel which left any of them unwritten fails its tests.
pub fn overwritable<E: SpinDtype>(len: usize) -> Vec<E> {
    let found = {
        let mut k = kept();
        let at = k
            .buffers
            .iter()
            .position(|b| b.downcast_ref::<Vec<E>>().is_some_and(|v| v.len() == len));
        at.and_then(|i| k.buffers.swap_remove(i).downcast::<Vec<E>>().ok())
            .map(|v| {
                k.bytes -= bytes(&v);
                *v
            })
    };
    let v = found.unwrap_or_else(|| zeros(len));
    #[cfg(test)]
    let v = {
        let mut v = v;
        v.fill(E::nan());
        v
    };
    v
}

/// The memory a buffer holds.
fn bytes<E>(v: &Vec<E>) -> usize {
    v.capacity() * std::mem::size_of::<E>()
}

/// Keeps `v` for a later [`overwritable`] of its length, unless that would keep more than
/// [`MAX_KEPT_BYTES`].
pub fn give_back<E: SpinDtype>(v: Vec<E>) {
    let bytes = bytes(&v);
    let mut k = kept();
    if v.is_empty() || k.bytes + bytes > MAX_KEPT_BYTES {
        return;
    }
    k.bytes += bytes;
    k.buffers.push(Box::new(v));
}

/// Frees every kept buffer (at the end of a training run).
pub fn release() {
    let mut k = kept();
    k.buffers.clear();
    k.bytes = 0;
}

/// Calls [`release`] when dropped: a training run holds one, so that the buffers kept for its
/// steps (a few hundred MB for DeiT-Tiny at batch 8) do not outlive it, whichever way it ends.
pub struct ReleaseOnDrop;

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer given back comes back for its length and dtype only, and under test every value
    /// handed out is NaN. (Other tests share the kept buffers, so lengths here are unusual.)
    #[test]
    fn buffers_come_back_for_their_length_and_dtype() {
        let mut a: Vec<f32> = overwritable(1237);
        assert!(a.len() == 1237 && a.iter().all(|v| v.is_nan()));
        a.fill(1.0);
        let ptr = a.as_ptr();
        give_back(a);
        let other: Vec<f64> = overwritable(1237);
        assert!(other.len() == 1237 && other.iter().all(|v| v.is_nan()));
        let shorter: Vec<f32> = overwritable(1236);
        assert_ne!(shorter.as_ptr(), ptr);
        let again: Vec<f32> = overwritable(1237);
        assert!(again.as_ptr() == ptr && again.iter().all(|v| v.is_nan()));
    }
}
