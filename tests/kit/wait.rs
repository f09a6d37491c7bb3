//! Waiting for an event with a bound that turns a hang into a failure.

use std::time::{Duration, Instant};

/// The bound of a wait for something that must happen: a hang turned into a
/// failure, not a speed target; a loaded machine never reaches it.
pub const HANG: Duration = Duration::from_secs(30);

/// Poll `ok` every 10 ms until it holds, at most `bound`; whether it held.
pub fn wait_until(bound: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
