//! Keeping the agent's resident memory to what it holds. Reading and checking a configuration
//! of 100 000 identities allocates several times what the checked configuration keeps (the
//! TOML document with a span for every value, the raw structures, error context), and the
//! small allocations that are kept end up spread over pages full of freed ones: measured
//! (16 000 identities) 1.8 KB resident per identity after the parse, with ~0.3 KB of it live.
//! So the configuration is built on a thread of its own (glibc gives it its own arena), a
//! compact copy is made on the caller's thread, and the parse's arena is handed back whole.

/// Hands the heap's free pages back to the kernel (glibc's `malloc_trim`, every arena).
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; no pointer is passed.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Fixes glibc's trim and mmap thresholds at their defaults. By default they grow each
/// time a large block (a parse's buffers) is freed, up to 32 MiB: then a thread arena's
/// freed top is never given back (`malloc_trim` trims only the main arena's top), and the
/// parse's garbage stays resident. Setting them turns the growth off.
fn fixed_thresholds() {
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Runs `build` on a thread of its own and returns a copy of what it built, made here, with
/// the thread's garbage freed and handed back. A panic in `build` is resumed here; where no
/// thread can be made, `build` runs here (correct, only less compact).
pub fn built_apart<T, E, F>(build: F) -> Result<T, E>
where
    T: Clone + Send,
    E: Send,
    F: FnOnce() -> Result<T, E> + Send,
{
    fixed_thresholds();
    let job = std::sync::Mutex::new(Some(build));
    let take = || job.lock().ok().and_then(|mut j| j.take());
    let apart = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("config-load".into())
            .spawn_scoped(s, || take().map(|f| f()))
            .ok()
            .map(|h| h.join())
    });
    let built = match apart {
        Some(Ok(Some(r))) => r?,
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        // No thread (or it found no job): here, then.
        Some(Ok(None)) | None => match take() {
            Some(f) => return f(),
            None => unreachable!("the job runs once, on the thread or here"),
        },
    };
    let kept = built.clone();
    drop(built);
    release_freed_memory();
    Ok(kept)
}

#[cfg(test)]
mod tests {
    #[test]
    fn what_is_built_apart_comes_back_errors_too() {
        assert_eq!(
            super::built_apart(|| Ok::<_, String>(vec![1, 2])),
            Ok(vec![1, 2])
        );
        assert_eq!(
            super::built_apart(|| Err::<Vec<u8>, _>("refused".to_owned())),
            Err("refused".to_owned())
        );
    }
}
