//! A loop device over an image for the `loop` paths (`losetup --direct-io`),
//! detached on drop.

use std::fs;
use std::io;
use std::path::Path;

use refblk_sim::scratchfs::{attach_loop, detach, run};

/// An attached loop device.
#[derive(Debug)]
pub struct LoopDev {
    dev: String,
    /// Whether the kernel actually runs it with direct I/O (`/sys/block/loopN/loop/dio`).
    pub dio: bool,
}

/// Whether the kernel runs `dev` with direct I/O (`/sys/block/loopN/loop/dio`).
fn runs_direct_io(dev: &str) -> io::Result<bool> {
    let name = dev.trim_start_matches("/dev/");
    fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
        .map(|s| s.trim() == "1")
        .map_err(|e| io::Error::new(e.kind(), format!("{dev}: reading loop/dio: {e}")))
}

/// Switch an attached loop device to direct I/O (`losetup --direct-io=on DEV`) and
/// check that the kernel did.
pub fn set_direct_io(dev: &str) -> io::Result<()> {
    run("losetup", &["--direct-io=on", dev])?;
    if runs_direct_io(dev)? {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{dev}: the kernel kept buffered I/O"
        )))
    }
}

impl LoopDev {
    /// Attach `image` with `--direct-io=on|off` (retried: parallel processes race for
    /// free devices).
    pub fn attach(image: &Path, direct_io: bool) -> io::Result<LoopDev> {
        let img = image.to_string_lossy();
        let opt = format!("--direct-io={}", if direct_io { "on" } else { "off" });
        let dev = attach_loop(&img, &[&opt])?;
        let dio = runs_direct_io(&dev).unwrap_or(false);
        if direct_io && !dio {
            log::warn!("{dev} over {img}: the kernel refused direct I/O");
        }
        Ok(LoopDev { dev, dio })
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        Path::new(&self.dev)
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        detach(&self.dev);
    }
}
