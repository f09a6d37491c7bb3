//! A loop device over an image for the `loop` paths (`losetup --direct-io`),
//! detached on drop.

use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

/// An attached loop device.
#[derive(Debug)]
pub struct LoopDev {
    dev: String,
    /// Whether the kernel actually runs it with direct I/O (`/sys/block/loopN/loop/dio`).
    pub dio: bool,
}

fn losetup(args: &[&str]) -> io::Result<String> {
    let out = Command::new("losetup")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run losetup: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "losetup {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Switch an attached loop device to direct I/O (`losetup --direct-io=on DEV`) and
/// check that the kernel did.
pub fn set_direct_io(dev: &str) -> io::Result<()> {
    losetup(&["--direct-io=on", dev])?;
    let name = dev.trim_start_matches("/dev/");
    match fs::read_to_string(format!("/sys/block/{name}/loop/dio")) {
        Ok(s) if s.trim() == "1" => Ok(()),
        Ok(_) => Err(io::Error::other(format!(
            "{dev}: the kernel kept buffered I/O"
        ))),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("{dev}: reading loop/dio: {e}"),
        )),
    }
}

impl LoopDev {
    /// Attach `image` with `--direct-io=on|off` (retried: parallel processes race for
    /// free devices).
    pub fn attach(image: &Path, direct_io: bool) -> io::Result<LoopDev> {
        let img = image.to_string_lossy();
        let dio = format!("--direct-io={}", if direct_io { "on" } else { "off" });
        let mut last = None;
        for attempt in 0..20 {
            match losetup(&["--find", "--show", &dio, &img]) {
                Ok(dev) if dev.starts_with("/dev/loop") => {
                    let name = dev.trim_start_matches("/dev/");
                    let dio = fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
                        .map(|s| s.trim() == "1")
                        .unwrap_or(false);
                    if direct_io && !dio {
                        log::warn!("{dev} over {img}: the kernel refused direct I/O");
                    }
                    return Ok(LoopDev { dev, dio });
                }
                Ok(other) => last = Some(io::Error::other(format!("losetup printed {other:?}"))),
                Err(e) => last = Some(e),
            }
            sleep(Duration::from_millis(50 + 50 * attempt));
        }
        Err(last.unwrap_or_else(|| io::Error::other("losetup failed")))
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        Path::new(&self.dev)
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        crate::util::scratchfs::detach(&self.dev);
    }
}
