//! Work that must not compete with getting a new config to the proxies: done by threads at
//! the lowest CPU priority (nice 19), so that on a busy node, or a controller with one CPU,
//! the config stream goes first.

use std::sync::{OnceLock, mpsc};

/// Frees `value` on the background thread. For a replaced config: the last reference to
/// 10,000 workloads takes 10+ ms to free, and whoever drops it pays.
pub fn drop_later<T: Send + 'static>(value: T) {
    static DROPPER: OnceLock<mpsc::Sender<Box<dyn Send>>> = OnceLock::new();
    let sender = DROPPER.get_or_init(|| {
        let (sender, values) = mpsc::channel::<Box<dyn Send>>();
        std::thread::Builder::new()
            .name("drop-later".into())
            .spawn(move || {
                lowest_priority();
                for value in values {
                    drop(value);
                }
            })
            .expect("spawning a thread");
        sender
    });
    // The thread lives as long as the process; were it gone, dropping here is still right.
    let _ = sender.send(Box::new(value));
}

/// Nice 19 for the calling thread only (Linux applies `setpriority(PRIO_PROCESS, 0)` to the
/// calling thread). Best effort: at worst the work runs at normal priority.
pub fn lowest_priority() {
    // SAFETY: setpriority only reads its arguments.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::AtomicBool};

    use super::*;

    struct Flag(Arc<AtomicBool>, std::thread::ThreadId);

    impl Drop for Flag {
        fn drop(&mut self) {
            assert_ne!(std::thread::current().id(), self.1, "dropped on the caller's thread");
            self.0.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    #[test]
    fn a_value_is_freed_on_the_background_thread() {
        let dropped = Arc::new(AtomicBool::new(false));
        drop_later(Flag(dropped.clone(), std::thread::current().id()));
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !dropped.load(std::sync::atomic::Ordering::Acquire) {
            assert!(std::time::Instant::now() < until, "never dropped");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
