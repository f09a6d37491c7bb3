//! `refblk demo`: a simulated guest uses a disk served by refblk.
//!
//! Everything runs in this process on the simulated Xen: the simulator
//! (xenstored, grant tables, event channels), the refblk backend, a toolstack
//! creating the vbd as libxl does, and a guest's blkfront
//! ([`crate::frontend`]). The guest writes, flushes, reads back, discards and
//! reads zeros, and the image file on the host shows the effect.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::{CliError, CliResult};
use crate::backend::{AttachOptions, Backend, BackendConfig};
use crate::frontend::{Frontend, FrontendOptions, Toolstack, VbdSpec};
use crate::platform::sim::SimXen;
use crate::util::size::{format_size, parse_size};
use crate::xenstore::XsClient;

/// Arguments of `refblk demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Image file to serve (created sparse if missing). Default: a file in a
    /// temporary directory, removed at the end.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Size of a created image.
    #[arg(long, default_value = "64M")]
    pub size: String,
    /// Bytes the guest writes (then reads back and discards).
    #[arg(long, default_value = "8M")]
    pub io: String,
}

fn fail(what: &str) -> impl Fn(std::io::Error) -> CliError + '_ {
    move |e| CliError::failed(format!("refblk demo: {what}: {e}"))
}

/// Run `refblk demo`.
pub fn run(args: DemoArgs) -> CliResult {
    let size = parse_size(&args.size).map_err(|e| CliError::usage(format!("--size: {e}")))?;
    let io = parse_size(&args.io).map_err(|e| CliError::usage(format!("--io: {e}")))?;
    let io = io / (1 << 20) * (1 << 20);
    if io == 0 || io > size {
        return Err(CliError::usage(format!(
            "--io must be at least 1M and at most --size ({})",
            format_size(size)
        )));
    }
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile_dir("/dev/shm")
    } else {
        tempfile_dir(&std::env::temp_dir().to_string_lossy())
    }
    .map_err(fail("temporary directory"))?;
    let result = demo(&base, &args, size, io);
    let _ = std::fs::remove_dir_all(&base);
    result
}

fn tempfile_dir(parent: &str) -> std::io::Result<PathBuf> {
    let d = PathBuf::from(parent).join(format!("refblk-demo.{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn demo(base: &std::path::Path, args: &DemoArgs, size: u64, io: u64) -> CliResult {
    let machine = base.join("machine");
    let image = match &args.image {
        Some(p) => p.clone(),
        None => base.join("disk.img"),
    };
    if !image.exists() {
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .map_err(|e| CliError::failed(format!("{}: {e}", image.display())))?;
    }
    let sim = SimXen::start(&machine).map_err(fail("simulated Xen"))?;
    let platform = Arc::new(sim.platform().map_err(fail("simulated platform"))?);
    let (backend, thread) =
        Backend::spawn(platform, BackendConfig::default()).map_err(fail("backend"))?;
    let xs = XsClient::connect_unix(&sim.xenstored_path())
        .map_err(|e| CliError::failed(format!("refblk demo: toolstack xenstore: {e}")))?;
    let ts = Toolstack::new(xs, backend.clone());
    let domid = 1;
    ts.create_domain(domid).map_err(fail("create domain"))?;
    let pages = (io / 4096 + 1024) as u32;
    let guest = Arc::new(
        sim.create_guest(domid, pages)
            .map_err(fail("create guest"))?,
    );
    let mut spec = VbdSpec::new(domid, 51712, &image);
    spec.attach = AttachOptions::default();
    let vbd = ts.add_vbd(&spec).map_err(fail("add vbd"))?;
    println!(
        "dom0: refblk serves {} as xvda of guest {domid} ({})",
        image.display(),
        vbd.backend_path
    );
    let opts = FrontendOptions {
        ring_page_order: 2,
        queues: 2,
        ..Default::default()
    };
    let mut fe = Frontend::connect(&sim.xenstored_path(), guest.clone(), 51712, opts)
        .map_err(fail("frontend connect"))?;
    let info = fe
        .info()
        .cloned()
        .ok_or_else(|| CliError::failed("not connected"))?;
    println!(
        "guest: xvda connected: {} ({} sectors), {}, {} queue(s) of {} slots, {} segments per request{}{}",
        format_size(info.sectors * 512),
        info.sectors,
        info.abi.protocol(),
        info.queues,
        info.ring_size,
        info.segments_per_request,
        if info.flush { ", flush" } else { "" },
        if info.discard { ", discard" } else { "" },
    );
    let data: Vec<u8> = (0..io as usize)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect();
    let blocks = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
    fe.write(0, &data).map_err(fail("write"))?;
    fe.flush().map_err(fail("flush"))?;
    let st = backend.status();
    let syncs = st.first().map_or(0, |s| s.fdatasyncs);
    println!(
        "guest: wrote {} at sector 0 and flushed (backend fdatasyncs: {syncs}); image uses {} on the host",
        format_size(io),
        format_size(blocks(&image))
    );
    let back = fe.read(0, io as usize).map_err(fail("read"))?;
    if back != data {
        return Err(CliError::failed("refblk demo: data read back differs"));
    }
    println!("guest: read back {}: identical", format_size(io));
    if info.discard {
        let half = io / 2;
        fe.discard(0, half / 512, false).map_err(fail("discard"))?;
        let z = fe.read(0, half as usize).map_err(fail("read"))?;
        let zeros = z.iter().all(|b| *b == 0);
        println!(
            "guest: discarded the first {}: reads {}; image now uses {} on the host",
            format_size(half),
            if zeros { "zeros" } else { "NOT zeros" },
            format_size(blocks(&image))
        );
        if !zeros {
            return Err(CliError::failed("refblk demo: discarded range is not zero"));
        }
    }
    fe.disconnect().map_err(fail("disconnect"))?;
    let st = backend.status();
    if let Some(s) = st.first() {
        println!(
            "dom0: {} requests ({} reads, {} writes, {} flushes, {} discards, {} errors)",
            s.requests, s.reads, s.writes, s.flushes, s.discards, s.errors
        );
    }
    ts.remove_vbd(&vbd).map_err(fail("remove vbd"))?;
    drop(fe);
    drop(guest);
    backend.stop();
    match thread.join() {
        Ok(r) => r.map_err(fail("backend")),
        Err(_) => Err(CliError::failed("refblk demo: backend thread panicked")),
    }?;
    println!("guest detached, backend stopped");
    Ok(())
}
