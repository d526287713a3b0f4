//! Hashing a file through a memory mapping without dying of SIGBUS.
//!
//! When another process truncates a file we have mapped, any load from a page
//! that is now past end-of-file raises SIGBUS, and by default SIGBUS kills the
//! whole process. Anyone who can truncate a file we check must not be able to
//! kill the verifier that way. So we do what libwayland-server does for wl_shm
//! pools. A process-wide SIGBUS handler looks for the fault address among the
//! ranges registered here. If it finds it, it maps anonymous zero pages over
//! the rest of that range, and the faulting load runs again and reads zeros.
//! The caller is then told that those bytes were not the file's.

// This is the only module allowed to use `unsafe`. Mapping a file, installing a
// signal handler and remapping pages from inside one have no safe API. The
// `unsafe` is kept in this file, and each block states why it is sound.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

/// What happened while the mapped bytes were fed to `update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MappedRead {
    /// Every byte fed came from the file, which still had at least `len` bytes afterwards.
    Complete,
    /// The file shrank or vanished under the mapping (or a page could not be
    /// read at all, e.g. an I/O error): the bytes fed are not the file's.
    Truncated,
}

/// Feeds the first `len` bytes of `file` to `update`, in order, in pieces of at
/// most `chunk` bytes. The pieces let the caller check for cancellation between
/// them, and let SHA work on pieces that fit in the cache. This API has no
/// safety preconditions.
///
/// `len == 0` maps nothing and returns `Complete`. If the file shrinks during
/// the call, `update` still gets `len` bytes in total, with zeros where pages
/// were lost, and the result is [`MappedRead::Truncated`].
///
/// # Errors
/// - `InvalidInput`: `chunk == 0`, or `len` does not fit in `usize`.
/// - `WouldBlock`: all guard slots are in use (too many mapped reads running at
///   once). Nothing was fed yet. Fall back to `read()`.
/// - `Unsupported`: no SIGBUS guard on this platform (only Linux has one). Fall back to `read()`.
/// - Anything `mmap`, `sigaction` or `fstat` reports.
pub(crate) fn read_mapped(
    file: &File,
    len: u64,
    chunk: usize,
    update: &mut dyn FnMut(&[u8]),
) -> io::Result<MappedRead> {
    if chunk == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "chunk size must be non-zero",
        ));
    }
    if len == 0 {
        return Ok(MappedRead::Complete);
    }
    let map_len = usize::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
    guard::install()?;
    // SAFETY: Rust assumes the bytes behind `&[u8]` do not change, but another
    // process can change or truncate the file while it is mapped. We accept this
    // for three reasons. (1) Truncation would otherwise mean SIGBUS, and the
    // guard registered below turns that into zero pages. (2) The bytes only go
    // to a hasher, which reads each byte once and does not depend on the
    // contents being stable. (3) Truncation is detected (fault flag + fstat) and
    // reported as `Truncated`, and any other change shows up as a wrong digest.
    let map = unsafe { memmap2::MmapOptions::new().len(map_len).map(file)? };
    // This is only a readahead hint, so if it fails we just run slower.
    let _ = map.advise(memmap2::Advice::Sequential);
    // `slot` is declared after `map`, so it is dropped before `map`, and that
    // holds during a panic in `update` as well. The range is therefore always
    // unregistered before it is unmapped. It never covers addresses that a
    // later mmap could reuse.
    let slot = guard::Registration::new(map.as_ptr() as usize, map_len)?;
    for piece in map.chunks(chunk) {
        update(piece);
    }
    let faulted = slot.faulted();
    drop(slot);
    drop(map);
    // A truncation that touched no page we still had to read causes no fault.
    // For example, cutting off only the tail of the last page.
    let shrunk = file.metadata()?.len() < len;
    Ok(if faulted || shrunk {
        MappedRead::Truncated
    } else {
        MappedRead::Complete
    })
}

#[cfg(target_os = "linux")]
mod guard {
    use libc::{c_int, c_void, siginfo_t};
    use std::io;
    use std::ptr;
    use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
    use std::sync::atomic::{compiler_fence, AtomicBool, AtomicI32, AtomicUsize};
    use std::sync::OnceLock;

    /// One registered range `[start, end)`, owned by thread `owner` (its tid; 0 = free).
    ///
    /// The handler only considers slots owned by the faulting thread. SIGBUS from
    /// a memory access goes to the thread that faulted, and that thread is stopped
    /// inside the handler, so it cannot be changing its own slots at that moment.
    /// This avoids seqlocks, and stops a slot that another thread is reusing from
    /// ever being read half-updated.
    struct Slot {
        owner: AtomicI32,
        start: AtomicUsize,
        end: AtomicUsize,
        faulted: AtomicBool,
    }

    const SLOTS: usize = 256;
    static TABLE: [Slot; SLOTS] = [const {
        Slot {
            owner: AtomicI32::new(0),
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            faulted: AtomicBool::new(false),
        }
    }; SLOTS];
    /// `sysconf` is not async-signal-safe, so the handler reads the page size stored here.
    static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
    /// The handler that was installed before ours. We chain to it.
    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

    fn errno() -> i32 {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    }

    /// Installs the handler once per process. Later calls return the stored result.
    pub(super) fn install() -> io::Result<()> {
        let outcome = INSTALLED.get_or_init(|| {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            match usize::try_from(page) {
                Ok(page) if page.is_power_of_two() => PAGE_SIZE.store(page, Relaxed),
                _ => return Err(libc::EINVAL),
            }
            // SAFETY: all-zero bytes are a valid `sigaction` (integers, a bit set, a None fn).
            let (mut previous, mut ours): (libc::sigaction, libc::sigaction) =
                unsafe { std::mem::zeroed() };
            // Read the previous action before installing ours. A fault that
            // arrives right after installation can then always be chained.
            // SAFETY: a null new action only queries; `previous` is a valid out-pointer.
            if unsafe { libc::sigaction(libc::SIGBUS, ptr::null(), &mut previous) } != 0 {
                return Err(errno());
            }
            let _ = PREVIOUS.set(previous);
            // The explicit type makes the compiler check the SA_SIGINFO signature.
            let handler: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) = on_sigbus;
            ours.sa_sigaction = handler as usize;
            // We do not set SA_NODEFER. While the handler runs, SIGBUS stays blocked,
            // so a fault inside the handler (which would be a bug) gets the kernel's
            // default action instead of recursing. SA_ONSTACK lets the handler run
            // on the alternate stack that std sets up for every thread.
            ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            // SAFETY: `sa_mask` is a valid sigset_t to initialise.
            unsafe { libc::sigemptyset(&mut ours.sa_mask) };
            // SAFETY: `ours` is a fully initialised action whose handler has the SA_SIGINFO signature.
            if unsafe { libc::sigaction(libc::SIGBUS, &ours, ptr::null_mut()) } != 0 {
                return Err(errno());
            }
            Ok(())
        });
        (*outcome).map_err(io::Error::from_raw_os_error)
    }

    fn current_tid() -> i32 {
        // SAFETY: gettid is a plain syscall: no preconditions, async-signal-safe.
        unsafe { libc::gettid() }
    }

    /// Registers `[start, start + len)` with the handler for as long as it is alive.
    pub(super) struct Registration {
        slot: &'static Slot,
    }

    impl Registration {
        pub(super) fn new(start: usize, len: usize) -> io::Result<Self> {
            let me = current_tid();
            let slot = TABLE
                .iter()
                .find(|s| s.owner.compare_exchange(0, me, Acquire, Relaxed).is_ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::WouldBlock, "all SIGBUS guard slots busy")
                })?;
            slot.faulted.store(false, Relaxed);
            slot.start.store(start, Relaxed);
            slot.end.store(start + len, Relaxed);
            // The only reader is this thread's own signal handler, so program
            // order would be enough. This signal fence keeps the compiler from
            // moving the stores after the reads of the mapping.
            compiler_fence(SeqCst);
            Ok(Self { slot })
        }

        pub(super) fn faulted(&self) -> bool {
            compiler_fence(SeqCst);
            self.slot.faulted.load(Relaxed)
        }
    }

    impl Drop for Registration {
        fn drop(&mut self) {
            compiler_fence(SeqCst);
            self.slot.end.store(0, Relaxed);
            self.slot.start.store(0, Relaxed);
            self.slot.owner.store(0, Release);
        }
    }

    /// Everything in here must be async-signal-safe: atomics and raw syscalls
    /// only, with no allocation, locks or I/O.
    extern "C" fn on_sigbus(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
        // SAFETY: `__errno_location` returns this thread's errno, which is always valid.
        let errno = unsafe { libc::__errno_location() };
        // SAFETY: as above. We save errno because the interrupted code may be about to read it.
        let saved = unsafe { *errno };
        let recovered = recover(info);
        // SAFETY: as above.
        unsafe { *errno = saved };
        if !recovered {
            chain(sig, info, ctx);
        }
    }

    fn recover(info: *const siginfo_t) -> bool {
        // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo_t.
        let info = unsafe { &*info };
        // Only a fault raised by the kernel (si_code > 0) has a meaningful si_addr.
        // A SIGBUS sent with kill() or tgkill() must not be mistaken for one.
        if info.si_code <= 0 {
            return false;
        }
        // SAFETY: for a kernel-generated SIGBUS, the union holds the fault fields.
        let addr = unsafe { info.si_addr() } as usize;
        let (me, page) = (current_tid(), PAGE_SIZE.load(Relaxed));
        for slot in TABLE.iter().filter(|s| s.owner.load(Relaxed) == me) {
            let (start, end) = (slot.start.load(Relaxed), slot.end.load(Relaxed));
            if !(start..end).contains(&addr) {
                continue;
            }
            // Replace everything from the faulting page up to the end of the
            // mapping, which is page-aligned. Pages after this one would almost
            // certainly fault too, so one syscall covers them all.
            let from = addr & !(page - 1);
            let to = (end + page - 1) & !(page - 1);
            // SAFETY: this thread registered [start, end) for a live mapping that it
            // is reading right now. The mapping is unregistered before it is unmapped,
            // so [from, to) lies inside it. MAP_FIXED atomically swaps those pages for
            // read-only zero pages. Only this mapping changes, and the only reference
            // into it is the slice being hashed, which is allowed to see new bytes
            // (see `read_mapped`).
            let new = unsafe {
                libc::mmap(
                    from as *mut c_void,
                    to - from,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if new == libc::MAP_FAILED {
                // If we returned now, the load would fault again forever. Crash instead.
                return false;
            }
            slot.faulted.store(true, Relaxed);
            return true;
        }
        false
    }

    /// Not our fault: behave as if we had never been installed.
    fn chain(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
        let (handler, flags) = PREVIOUS
            .get()
            .map_or((libc::SIG_DFL, 0), |p| (p.sa_sigaction, p.sa_flags));
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            // Reset to the default action and return. The faulting instruction runs
            // again, faults again, and the kernel applies the default action (core
            // dump), as if we had never been installed. The kernel also forces the
            // default action for an ignored hardware SIGBUS, so SIG_IGN is handled the same way.
            // SAFETY: all-zero bytes are a valid `sigaction`, and SIG_DFL is 0.
            let default: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: sigaction is async-signal-safe, and `default` is valid.
            unsafe { libc::sigaction(sig, &default, ptr::null_mut()) };
        } else if flags & libc::SA_SIGINFO != 0 {
            // SAFETY: the previous owner installed this value as an SA_SIGINFO handler of this signature.
            let f: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) =
                unsafe { std::mem::transmute(handler) };
            f(sig, info, ctx);
        } else {
            // SAFETY: without SA_SIGINFO, the previous value is a plain `void (*)(int)` handler.
            let f: extern "C" fn(c_int) = unsafe { std::mem::transmute(handler) };
            f(sig);
        }
    }

    #[cfg(test)]
    pub(super) fn slots_held_by_current_thread() -> usize {
        let me = current_tid();
        TABLE.iter().filter(|s| s.owner.load(Relaxed) == me).count()
    }
}

#[cfg(not(target_os = "linux"))]
mod guard {
    //! No SIGBUS guard here: refuse, so the caller falls back to `read()`.
    use std::io;
    pub(super) fn install() -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    pub(super) struct Registration;
    impl Registration {
        pub(super) fn new(_: usize, _: usize) -> io::Result<Self> {
            install().map(|()| Self)
        }
        pub(super) fn faulted(&self) -> bool {
            false
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    // Not tested here: a fault outside every registered range must still crash.
    // That would kill the test process. The path is `chain` above. std has
    // already put its own stack-overflow SIGBUS handler in place, so we call it,
    // and for a fault outside a guard page it resets SIGBUS to SIG_DFL and returns.
    // The faulting instruction then runs again and the process dies as it would
    // have without us. If there is no previous handler, we reset to SIG_DFL ourselves.
    use super::*;
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::sync::Barrier;

    fn read_all(file: &File, len: u64, chunk: usize) -> (Vec<u8>, MappedRead) {
        let mut fed = Vec::new();
        let outcome = read_mapped(file, len, chunk, &mut |piece| {
            assert!(!piece.is_empty() && piece.len() <= chunk);
            fed.extend_from_slice(piece);
        });
        (fed, outcome.expect("read_mapped"))
    }

    #[test]
    fn mmap_feeds_every_byte_in_order() {
        for size in [0, 1, 4095, 4096, 4097, 5 << 20, (3 << 20) + 17] {
            let data: Vec<u8> = (0..=250u8).cycle().take(size).collect();
            let mut tmp = tempfile::NamedTempFile::new().expect("tempfile");
            tmp.write_all(&data).expect("write");
            let on_disk = std::fs::read(tmp.path()).expect("read");
            let (fed, outcome) = read_all(tmp.as_file(), data.len() as u64, 1000);
            assert_eq!(
                (fed == on_disk, outcome),
                (true, MappedRead::Complete),
                "size {size}"
            );
        }
    }

    #[test]
    fn mmap_len_beyond_eof_is_truncated_not_fatal() {
        let mut tmp = tempfile::NamedTempFile::new().expect("tempfile");
        tmp.write_all(b"0123456789").expect("write");
        let (fed, outcome) = read_all(tmp.as_file(), 3 * 4096, 4096);
        assert_eq!(
            (fed.len(), &fed[..10], outcome),
            (3 * 4096, &b"0123456789"[..], MappedRead::Truncated)
        );
        assert!(fed[10..].iter().all(|&b| b == 0));
    }

    /// The file is cut to `cut` bytes on another handle while `update` is held
    /// at chunk `at`. The barrier guarantees that this happens in the middle of the read.
    fn truncate_mid_read(path: &std::path::Path, cut: u64, at: usize) {
        const LEN: u64 = 64 << 20;
        const CHUNK: usize = 1 << 20;
        let mut writer = File::create(path).expect("create");
        let block = vec![0xA5u8; CHUNK];
        (0..LEN / CHUNK as u64).for_each(|_| writer.write_all(&block).expect("write"));
        let reader = File::open(path).expect("open");
        let truncator = OpenOptions::new().write(true).open(path).expect("open");
        let barrier = Barrier::new(2);
        let zeros = vec![0u8; CHUNK];
        let (mut calls, mut offset, mut nonzero_pieces) = (0, 0usize, 0usize);
        // Past this offset the pages were gone when they were read, so they must read as zeros.
        let zeros_from = usize::try_from(cut.next_multiple_of(4096))
            .expect("fits")
            .max((at + 1) * CHUNK);
        let outcome = std::thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                truncator.set_len(cut).expect("set_len");
                barrier.wait();
            });
            read_mapped(&reader, LEN, CHUNK, &mut |piece| {
                if calls == at {
                    barrier.wait();
                    barrier.wait();
                }
                calls += 1;
                let skip = zeros_from.saturating_sub(offset).min(piece.len());
                // Compare with a zero buffer because that is a memcmp, which stays fast in debug builds.
                nonzero_pieces += usize::from(piece[skip..] != zeros[..piece.len() - skip]);
                offset += piece.len();
            })
        });
        assert_eq!(
            outcome.expect("read_mapped"),
            MappedRead::Truncated,
            "cut {cut} at chunk {at}"
        );
        assert_eq!(
            (offset as u64, nonzero_pieces),
            (LEN, 0),
            "cut {cut} at chunk {at}"
        );
        std::fs::remove_file(path).expect("remove");
    }

    #[test]
    fn mmap_truncated_in_a_loop_under_reads_never_kills_the_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        const HALF: u64 = 32 << 20;
        // 0, half, odd offsets, a single byte less (no fault, only fstat notices), one page.
        let cuts = [0, HALF, 1, HALF / 3 + 123, (64 << 20) - 1, 4096];
        // Four threads at once, so several slots are live and each thread's
        // faults must find its own slot.
        std::thread::scope(|s| {
            for t in 0..4 {
                let dir = dir.path();
                s.spawn(move || {
                    (0..9).for_each(|i| {
                        // Each worker and round gets its own file. If two workers shared one,
                        // one worker's rewrite would refill the other's truncated file.
                        let path = dir.join(format!("worker{t}-round{i}"));
                        truncate_mid_read(&path, cuts[(t + i) % cuts.len()], (t * 9 + i) % 7)
                    })
                });
            }
        });
        // The handler stays installed, and later mappings still read normally.
        let data: Vec<u8> = (0..=250u8).cycle().take(3 << 20).collect();
        let mut tmp = tempfile::NamedTempFile::new().expect("tempfile");
        tmp.write_all(&data).expect("write");
        assert_eq!(
            read_all(tmp.as_file(), data.len() as u64, 1 << 16),
            (data, MappedRead::Complete)
        );
    }

    #[test]
    fn mmap_slot_released_when_update_panics() {
        let mut tmp = tempfile::NamedTempFile::new().expect("tempfile");
        tmp.write_all(&[1; 10_000]).expect("write");
        let result = std::panic::catch_unwind(|| {
            read_mapped(tmp.as_file(), 10_000, 4096, &mut |_| {
                panic!("hasher exploded")
            })
        });
        assert!(result.is_err());
        assert_eq!(guard::slots_held_by_current_thread(), 0);
    }

    #[test]
    fn mmap_rejects_zero_chunk_and_maps_nothing_for_zero_len() {
        let tmp = tempfile::NamedTempFile::new().expect("tempfile");
        let err = read_mapped(tmp.as_file(), 1, 0, &mut |_| {}).expect_err("chunk 0");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let outcome = read_mapped(tmp.as_file(), 0, 1, &mut |_| unreachable!());
        assert_eq!(outcome.expect("len 0"), MappedRead::Complete);
    }
}
