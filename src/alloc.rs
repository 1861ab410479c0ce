//! The process's allocator: mimalloc, asked for plain blocks wherever their natural alignment
//! covers the layout, as the standard library's own `System` allocator does with `malloc`.
//!
//! `mimalloc::MiMalloc` asks for every block through `mi_malloc_aligned`, whose fast path gives
//! up whenever its page's free list is empty, which in a proxy's alloc-and-free rhythm is often:
//! its aligned slow path then cost about 160 instructions a time, 2.6 times per request, where
//! `mi_malloc`'s costs about 100. Callgrind, 1 KiB through the proxy: 19,809 → 19,355
//! instructions per request (docs/BENCHMARKS.md).
//!
//! In front of it, each runtime thread keeps the small blocks it frees and hands the last one
//! freed out first ([`cache_this_thread`]). mimalloc hands out a page's whole free list before
//! the blocks freed since. After a burst of requests has spread its free lists over whole pages,
//! a steady load then takes a cold block for nearly every allocation: 2–3% more CPU per
//! request for as long as the load lasts (docs/BENCHMARKS.md, run 15).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::ptr;

use libmimalloc_sys::{mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned};
use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};

/// The alignment of every mimalloc block at least this large (`MI_MAX_ALIGN_SIZE`, the size of
/// `max_align_t`), as `malloc` guarantees.
const PLAIN_ALIGN: usize = 16;

/// Blocks of at most this many bytes, aligned to at most [`PLAIN_ALIGN`], are kept for reuse.
const CACHED_MAX: usize = 1024;

/// The kept blocks' size classes are this many bytes apart. A block of a class is always
/// allocated at the class's top size, so that any block of the class serves any request in it.
const CLASS_STEP: usize = 16;

/// The number of size classes.
const CLASSES: usize = CACHED_MAX / CLASS_STEP;

/// Blocks kept per class and thread. What a thread holds back from mimalloc is at most
/// `CACHE_DEPTH` × the classes' sizes: 2.1 MB.
const CACHE_DEPTH: usize = 64;

/// One thread's kept blocks: a stack per size class, the last freed on top.
struct Cache {
    /// Whether this thread keeps blocks ([`cache_this_thread`]).
    on: bool,
    /// How many blocks each class's stack holds.
    len: [u8; CLASSES],
    /// The stacks.
    blocks: [[*mut u8; CACHE_DEPTH]; CLASSES],
}

thread_local! {
    /// Const-initialised and without a destructor, so it is there for every call, even while
    /// the thread exits.
    static CACHE: UnsafeCell<Cache> = const {
        UnsafeCell::new(Cache {
            on: false,
            len: [0; CLASSES],
            blocks: [[ptr::null_mut(); CACHE_DEPTH]; CLASSES],
        })
    };
}

/// Runs `f` on this thread's cache. `f` must not use the Rust allocator, which would re-enter it.
fn with_cache<R>(f: impl FnOnce(&mut Cache) -> R) -> R {
    // SAFETY: the cell is this thread's own, and no caller's `f` uses the Rust allocator or
    // calls `with_cache`, so this is the only reference to it while `f` runs.
    CACHE.with(|cache| f(unsafe { &mut *cache.get() }))
}

/// Starts keeping freed small blocks on this thread. For threads that live as long as the
/// process, or that call [`release_this_thread`] before they end: a thread that ends holding
/// blocks leaks them.
pub fn cache_this_thread() {
    with_cache(|cache| cache.on = true);
}

/// Stops keeping blocks on this thread and gives back those it holds.
pub fn release_this_thread() {
    // `mi_free` is mimalloc's own, not this allocator: it does not re-enter the cache.
    with_cache(|cache| {
        cache.on = false;
        for (blocks, len) in cache.blocks.iter().zip(&mut cache.len) {
            for &block in &blocks[..usize::from(*len)] {
                // SAFETY: a kept block is a live mimalloc block that nothing else refers to.
                unsafe { mi_free(block.cast::<c_void>()) }
            }
            *len = 0;
        }
    });
}

/// The size class of a layout of `size` and `align`, if its blocks are kept.
fn class_of(size: usize, align: usize) -> Option<usize> {
    (align <= PLAIN_ALIGN && size <= CACHED_MAX).then(|| size.saturating_sub(1) / CLASS_STEP)
}

/// The size every block of `class` is allocated at.
fn class_size(class: usize) -> usize {
    (class + 1) * CLASS_STEP
}

/// The last block of `class` this thread kept, if any.
fn take(class: usize) -> Option<*mut u8> {
    with_cache(|cache| {
        let n = cache.len[class];
        if !cache.on || n == 0 {
            return None;
        }
        cache.len[class] = n - 1;
        Some(cache.blocks[class][usize::from(n - 1)])
    })
}

/// Keeps `block` of `class` if this thread keeps blocks and has room: whether it did.
fn keep(class: usize, block: *mut u8) -> bool {
    with_cache(|cache| {
        let n = usize::from(cache.len[class]);
        if !cache.on || n == CACHE_DEPTH {
            return false;
        }
        cache.blocks[class][n] = block;
        cache.len[class] += 1;
        true
    })
}

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
// `layout.align()`. `mi_free` frees blocks from either kind of call. A layout of a kept size
// class is always served with a block of at least the class's top size (a multiple of 16, so
// `plain` holds for it), whether new, kept, or reallocated; so a kept block, which no one else
// refers to, serves any later layout of its class.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        // SAFETY: see the impl.
        unsafe {
            if let Some(class) = class_of(size, layout.align()) {
                return match take(class) {
                    Some(block) => block,
                    None => mi_malloc(class_size(class)).cast(),
                };
            }
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
            if let Some(class) = class_of(size, layout.align()) {
                return match take(class) {
                    Some(block) => {
                        block.write_bytes(0, size);
                        block
                    }
                    None => mi_zalloc(class_size(class)).cast(),
                };
            }
            if plain(layout.align(), size) {
                mi_zalloc(size).cast()
            } else {
                mi_zalloc_aligned(size, layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if class_of(layout.size(), layout.align()).is_some_and(|class| keep(class, ptr)) {
            return;
        }
        // SAFETY: `ptr` came from this allocator (the caller's contract).
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl; `ptr` came from this allocator (the caller's contract).
        unsafe {
            match (
                class_of(layout.size(), layout.align()),
                class_of(new_size, layout.align()),
            ) {
                // The block already has the class's top size.
                (Some(old), Some(new)) if old == new => return ptr,
                (_, Some(new)) => return mi_realloc(ptr.cast::<c_void>(), class_size(new)).cast(),
                _ => {}
            }
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

    /// How many blocks of `class` this thread keeps.
    fn kept(class: usize) -> usize {
        with_cache(|cache| usize::from(cache.len[class]))
    }

    #[test]
    fn every_block_is_aligned_as_its_layout_asks() {
        aligned_as_asked();
    }

    #[test]
    fn every_block_is_aligned_as_its_layout_asks_with_blocks_kept() {
        cache_this_thread();
        aligned_as_asked();
        aligned_as_asked(); // now from kept blocks
        release_this_thread();
    }

    #[test]
    fn the_last_block_freed_is_the_next_one_handed_out() {
        let a = Allocator;
        let (small, same_class) = (Layout::new::<[u8; 100]>(), Layout::new::<[u8; 97]>());
        cache_this_thread();
        // SAFETY: non-zero layouts; every block is freed by the same allocator, with its layout.
        unsafe {
            let p = a.alloc(small);
            p.write_bytes(0xff, small.size());
            a.dealloc(p, small);
            assert_eq!(kept(class_of(100, 1).unwrap()), 1);
            let q = a.alloc_zeroed(same_class);
            assert_eq!(q, p, "the kept block, for any size of its class");
            assert!((0..same_class.size()).all(|i| *q.add(i) == 0), "zeroed");
            q.write_bytes(0x5a, same_class.size());
            // Growing within the class keeps the block; beyond it keeps the contents.
            assert_eq!(a.realloc(q, same_class, 112), q);
            let r = a.realloc(q, Layout::new::<[u8; 112]>(), 300);
            assert!((0..97).all(|i| *r.add(i) == 0x5a), "contents kept");
            a.dealloc(r, Layout::new::<[u8; 300]>());
        }
        release_this_thread();
        assert_eq!(kept(class_of(300, 1).unwrap()), 0, "given back");
        // SAFETY: as above.
        unsafe { a.dealloc(a.alloc(small), small) };
        assert_eq!(kept(class_of(100, 1).unwrap()), 0, "no longer kept");
    }

    #[test]
    fn a_thread_keeps_at_most_cache_depth_blocks_per_class_and_none_it_cannot_serve() {
        let a = Allocator;
        let layout = Layout::new::<[u64; 8]>();
        let class = class_of(layout.size(), layout.align()).unwrap();
        cache_this_thread();
        // SAFETY: as above.
        unsafe {
            let blocks: Vec<*mut u8> = (0..CACHE_DEPTH + 5).map(|_| a.alloc(layout)).collect();
            for &b in &blocks {
                a.dealloc(b, layout);
            }
            assert_eq!(kept(class), CACHE_DEPTH);
            // Over-aligned and large blocks go straight back to mimalloc.
            let wide = Layout::from_size_align(64, 64).unwrap();
            a.dealloc(a.alloc(wide), wide);
            let large = Layout::new::<[u8; CACHED_MAX + 1]>();
            a.dealloc(a.alloc(large), large);
            assert_eq!(
                with_cache(|c| c.len.iter().map(|&n| usize::from(n)).sum::<usize>()),
                CACHE_DEPTH
            );
        }
        release_this_thread();
        assert_eq!(kept(class), 0);
    }

    fn aligned_as_asked() {
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
