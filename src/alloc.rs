//! The process's allocator: mimalloc, asked for plain blocks wherever their natural alignment
//! covers the layout, as the standard library's own `System` allocator does with `malloc`.
//!
//! `mimalloc::MiMalloc` asks for every block through `mi_malloc_aligned`, whose fast path gives
//! up whenever its page's free list is empty, which in a proxy's alloc-and-free rhythm is often:
//! its aligned slow path then cost about 160 instructions a time, 2.6 times per request, where
//! `mi_malloc`'s costs about 100. Callgrind, 1 KiB through the proxy: 19,809 → 19,355
//! instructions per request (docs/BENCHMARKS.md).

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned};
use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};

/// The alignment of every mimalloc block at least this large (`MI_MAX_ALIGN_SIZE`, the size of
/// `max_align_t`), as `malloc` guarantees.
const PLAIN_ALIGN: usize = 16;

/// mimalloc, with the plain entry points for layouts they serve (see the module docs). Set it
/// with `#[global_allocator] static A: tokengate::alloc::Allocator = tokengate::alloc::Allocator;`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

/// Whether a plain block of `size` bytes is aligned enough for `align`: `malloc`'s guarantee,
/// the test std's `System` makes too.
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: each method forwards to the mimalloc function for the same job, with the layout's
// size; a plain block is returned only where `plain` holds, where mimalloc aligns it to at least
// `layout.align()`. `mi_free` frees blocks from either kind of call.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        // SAFETY: see the impl.
        unsafe {
            if plain(layout.align(), size) {
                mi_malloc(size).cast()
            } else {
                mi_malloc_aligned(size, layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        // SAFETY: see the impl.
        unsafe {
            if plain(layout.align(), size) {
                mi_zalloc(size).cast()
            } else {
                mi_zalloc_aligned(size, layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract).
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl; `ptr` came from this allocator (the caller's contract).
        unsafe {
            if plain(layout.align(), new_size) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_is_aligned_as_its_layout_asks() {
        let a = Allocator;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [align, align * 3, 24, 100, 1000, 5000, 70_000] {
                let Ok(layout) = Layout::from_size_align(size.max(align), align) else {
                    continue;
                };
                // SAFETY: a non-zero layout; every block is freed by the same allocator.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc {layout:?}");
                    p.write_bytes(0xa5, layout.size());
                    let grown = a.realloc(p, layout, layout.size() * 2 + 8);
                    assert_eq!(grown as usize % align, 0, "realloc {layout:?}");
                    assert_eq!(*grown.add(layout.size() - 1), 0xa5, "contents kept");
                    a.dealloc(
                        grown,
                        Layout::from_size_align(layout.size() * 2 + 8, align).unwrap(),
                    );
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "alloc_zeroed {layout:?}");
                    assert!((0..layout.size()).all(|i| *z.add(i) == 0), "zeroed");
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
