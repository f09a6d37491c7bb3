//! SIGINT/SIGTERM handling for the long-running commands: block the signals in
//! every thread (call [`block_terminate`] before any thread starts, threads
//! inherit the mask) and wait for them on one thread with `sigwait`.

use std::io;

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};

fn set() -> SigSet {
    let mut s = SigSet::empty();
    s.add(Signal::SIGINT);
    s.add(Signal::SIGTERM);
    s
}

/// Block SIGINT and SIGTERM in this thread (and in the threads it starts later).
pub fn block_terminate() -> io::Result<()> {
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set()), None).map_err(io::Error::from)
}

/// Run `f` on a thread once SIGINT or SIGTERM arrives.
pub fn on_terminate(f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name("refblk-signals".into())
        .spawn(move || {
            if let Ok(sig) = set().wait() {
                log::info!("{sig:?}: stopping");
            }
            f();
        })?;
    Ok(())
}
