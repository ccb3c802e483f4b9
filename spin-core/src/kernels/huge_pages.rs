//! Host buffers on transparent huge pages, for activations that a kernel reads or writes a cache
//! line per pixel, C values apart (the depthwise pass): on 4 KiB pages nearly every such access
//! needs another TLB entry. Linux backs a region advised with `MADV_HUGEPAGE` by 2 MiB pages
//! where it can (in its usual THP mode, `madvise`, only where asked); elsewhere the buffer is only
//! aligned.
use super::elementwise::CHUNK;
use crate::base::SpinDtype;
use rayon::prelude::*;
use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::mem::MaybeUninit;
use std::ptr::NonNull;

/// A huge page: the buffers' alignment and the unit of their size.
pub const HUGE_PAGE: usize = 2 << 20;

/// `len` values in memory of their own, aligned to [`HUGE_PAGE`] and advised onto huge pages.
pub struct HugeBuffer<E> {
    ptr: NonNull<E>,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer owns its values, as a Vec<E> does.
unsafe impl<E: Send> Send for HugeBuffer<E> {}
// SAFETY: shared access only reads, as for a Vec<E>.
unsafe impl<E: Sync> Sync for HugeBuffer<E> {}

impl<E: SpinDtype> HugeBuffer<E> {
    /// A copy of `src`, written across threads (each page's first touch, so the kernel maps it
    /// as a huge page then).
    pub fn copied(src: &[E]) -> Self {
        let bytes = std::mem::size_of_val(src).max(1).next_multiple_of(HUGE_PAGE);
        let layout = Layout::from_size_align(bytes, HUGE_PAGE).expect("a huge buffer's layout");
        // SAFETY: the layout's size is not zero.
        let raw = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(raw as *mut E) else {
            handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        // SAFETY: [raw, raw + bytes) is this allocation, whole pages from a page boundary; advice
        // changes how they are mapped, not what they hold. Its result is ignored: without huge
        // pages the buffer still works, on small ones.
        unsafe {
            libc::madvise(raw as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
        }
        // SAFETY: the allocation holds `bytes` ≥ src.len() values of E at an alignment (2 MiB)
        // that is a multiple of E's; as MaybeUninit they need no initial values.
        let slots = unsafe { std::slice::from_raw_parts_mut(raw as *mut MaybeUninit<E>, src.len()) };
        slots
            .par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(dst, src)| {
                for (d, &s) in dst.iter_mut().zip(src) {
                    d.write(s);
                }
            });
        Self {
            ptr,
            len: src.len(),
            layout,
        }
    }
}

impl<E> std::ops::Deref for HugeBuffer<E> {
    type Target = [E];
    fn deref(&self) -> &[E] {
        // SAFETY: `len` values from `ptr` were written in `copied` and live until drop.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<E> std::ops::DerefMut for HugeBuffer<E> {
    fn deref_mut(&mut self) -> &mut [E] {
        // SAFETY: as in `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<E> Drop for HugeBuffer<E> {
    fn drop(&mut self) {
        // SAFETY: allocated in `copied` with this layout; E needs no drop (SpinDtype is Copy).
        unsafe { dealloc(self.ptr.as_ptr() as *mut u8, self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_buffer_holds_a_copy_and_is_aligned() {
        // Two huge pages and a bit: the copy spans page boundaries and several copy tasks.
        let src: Vec<f32> = (0..HUGE_PAGE / 2 + 1000).map(|i| i as f32 * 0.5).collect();
        let mut b = HugeBuffer::copied(&src);
        assert_eq!(&b[..], &src[..]);
        assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
        b[7] = -1.0;
        assert_eq!((b[6], b[7]), (3.0, -1.0));
        assert!(HugeBuffer::<f64>::copied(&[]).is_empty());
    }
}
