//! `refblk demo`: the whole path on the simulated Xen, in one process — the
//! simulator, the refblk backend, a toolstack that creates a vbd as libxl does,
//! and a guest whose blkfront writes, flushes, discards and reads its disk.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{CliError, CliResult};
use refblk_core::backend::{Backend, BackendConfig};
use refblk_core::platform::Platform;
use refblk_core::util::size::{format_size, parse_size};
use refblk_sim::frontend::{Frontend, FrontendOptions, IoRequest, Protocol, Toolstack, VbdSpec};
use refblk_sim::SimXen;

/// Arguments of `refblk demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Directory for the simulated machine and the image [default: a new
    /// directory under /dev/shm, removed afterwards].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Size of the guest's disk image (e.g. 64M, 1G).
    #[arg(long, default_value = "64M", value_parser = parse_size_arg)]
    pub size: u64,
    /// Ring pages as a power of two (0..=4).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=4))]
    pub ring_page_order: u32,
    /// Use the x86_32 ring layout instead of x86_64.
    #[arg(long)]
    pub x86_32: bool,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

const DOMID: u16 = 5;
const DEVID: u32 = 51712; // xvda

fn fail(what: &str) -> impl Fn(io::Error) -> CliError + '_ {
    move |e| CliError::failed(format!("demo: {what}: {e}"))
}

fn allocated(p: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(p)?.blocks() * 512)
}

/// Run `refblk demo`.
pub fn run(a: DemoArgs) -> CliResult {
    if a.size < 4 << 20 || !a.size.is_multiple_of(4096) {
        return Err(CliError::usage(
            "demo: --size must be a multiple of 4096 and at least 4M",
        ));
    }
    let _tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            let base = if Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            };
            let t = tempfile::Builder::new()
                .prefix("refblk-demo.")
                .tempdir_in(&base)
                .map_err(fail("temporary directory"))?;
            let d = t.path().to_path_buf();
            _tmp = t; // removed when the demo ends
            d
        }
    };
    std::fs::create_dir_all(&dir).map_err(fail("create the demo directory"))?;

    // 1. The simulated Xen, and a key written and read through its xenstored.
    let sim = SimXen::start(&dir.join("machine")).map_err(fail("start the simulated Xen"))?;
    println!(
        "simulated Xen:   xenstored on {}, grant tables and event channels beside it",
        sim.xenstored_path().display()
    );
    let platform: Arc<dyn Platform> = Arc::new(sim.platform().map_err(fail("simulated platform"))?);
    let xs = platform.xenstore().map_err(fail("xenstore"))?;
    let key = format!("/local/domain/{DOMID}/name");
    xs.write(0, &key, b"demo-guest")
        .map_err(|e| CliError::failed(format!("demo: xenstore write {key}: {e}")))?;
    let name = xs
        .read_string(0, &key)
        .map_err(|e| CliError::failed(format!("demo: xenstore read {key}: {e}")))?;
    println!("xenstore:        wrote and read back {key} = {name:?}");

    // 2. The image and the backend.
    let image = dir.join("guest-disk.img");
    let f = std::fs::File::create(&image).map_err(fail("create the image"))?;
    f.set_len(a.size).map_err(fail("size the image"))?;
    drop(f);
    let (backend, thread) = Backend::spawn(platform.clone(), BackendConfig::default())
        .map_err(fail("start the backend"))?;
    println!(
        "refblk backend:  serving /local/domain/0/backend/vbd on the simulated Xen; image {} ({}, sparse)",
        image.display(),
        format_size(a.size)
    );

    let result = guest_session(&sim, &backend, &image, &a);

    backend.stop();
    let _ = thread.join();
    result?;
    println!("done:            backend stopped, simulated Xen shut down");
    Ok(())
}

fn guest_session(
    sim: &SimXen,
    backend: &refblk_core::backend::BackendHandle,
    image: &Path,
    a: &DemoArgs,
) -> CliResult {
    // 3. A toolstack creates the guest's vbd as libxl does; the backend claims it.
    let dom0_xs = xs_clone(sim)?;
    let ts = Toolstack::new(dom0_xs, backend.clone());
    ts.create_domain(DOMID).map_err(fail("create domain"))?;
    let guest = Arc::new(
        sim.create_guest(DOMID, 8192)
            .map_err(fail("create the guest's memory"))?,
    );
    let vbd = ts
        .add_vbd(&VbdSpec::new(DOMID, DEVID, image))
        .map_err(fail("add the vbd"))?;
    println!(
        "toolstack:       dom{DOMID} xvda -> {} (script block-refblk, hotplug add done)",
        vbd.backend_path
    );

    // 4. The guest's blkfront connects.
    let opts = FrontendOptions {
        protocol: if a.x86_32 {
            Protocol::X86_32
        } else {
            Protocol::X86_64
        },
        ring_page_order: a.ring_page_order,
        ..FrontendOptions::default()
    };
    let mut fe = Frontend::connect(&sim.xenstored_path(), guest, DEVID, opts)
        .map_err(fail("frontend connect"))?;
    let info = fe
        .info()
        .cloned()
        .ok_or_else(|| CliError::failed("demo: no disk info"))?;
    println!(
        "guest blkfront:  connected: {} sectors of {} bytes, {:?} ring of {} page(s) / {} slots, {} queue(s), indirect {} segments, flush {}, discard {}",
        info.sectors,
        info.sector_size,
        info.abi,
        info.ring_pages,
        info.ring_size,
        info.queues,
        info.backend_max_indirect_segments,
        info.flush,
        info.discard
    );
    let used0 = allocated(image).map_err(fail("stat the image"))?;

    // 5. Write 8 MiB (2048 pages, 32 in flight), flush, read back, verify.
    let n_pages = 2048usize.min((info.sectors / 8) as usize);
    let page = |i: usize| -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        for (j, b) in p.iter_mut().enumerate() {
            *b = (i.wrapping_mul(131) ^ j.wrapping_mul(7)) as u8;
        }
        p
    };
    let t = Instant::now();
    run_queued(&mut fe, n_pages, |i, fe| {
        let data = page(i);
        fe.submit(
            None,
            IoRequest::Write {
                sector: (i * 8) as u64,
                data: &data,
            },
        )
    })?;
    let w_secs = t.elapsed().as_secs_f64();
    fe.flush().map_err(fail("flush"))?;
    let used1 = allocated(image).map_err(fail("stat the image"))?;
    println!(
        "guest writes:    {} x 4 KiB, 32 in flight: {:.0} IOPS; flushed; image now uses {}",
        n_pages,
        n_pages as f64 / w_secs,
        format_size(used1.saturating_sub(used0))
    );
    let t = Instant::now();
    let mut bad = 0usize;
    for chunk in (0..n_pages).collect::<Vec<_>>().chunks(32) {
        let tags: Vec<_> = chunk
            .iter()
            .map(|&i| {
                fe.submit(
                    None,
                    IoRequest::Read {
                        sector: (i * 8) as u64,
                        len: 4096,
                    },
                )
                .map(|t| (t, i))
            })
            .collect::<io::Result<_>>()
            .map_err(fail("submit read"))?;
        for (tag, i) in tags {
            let c = fe
                .wait_for(tag, std::time::Duration::from_secs(20))
                .map_err(fail("read"))?;
            let data = c.into_result().map_err(fail("read"))?;
            if data != page(i) {
                bad += 1;
            }
        }
    }
    let r_secs = t.elapsed().as_secs_f64();
    if bad > 0 {
        return Err(CliError::failed(format!(
            "demo: {bad} of {n_pages} pages read back wrong"
        )));
    }
    println!(
        "guest reads:     {} x 4 KiB: {:.0} IOPS; every page matches what was written",
        n_pages,
        n_pages as f64 / r_secs
    );

    // 6. Discard the first 4 MiB: the space goes back, the range reads as zeros.
    if info.discard {
        let sectors = (4u64 << 20) / 512;
        fe.discard(0, sectors, false).map_err(fail("discard"))?;
        let used2 = allocated(image).map_err(fail("stat the image"))?;
        let zeros = fe.read(0, 1 << 20).map_err(fail("read after discard"))?;
        if zeros.iter().any(|&b| b != 0) {
            return Err(CliError::failed(
                "demo: discarded range did not read back as zeros",
            ));
        }
        println!(
            "guest discard:   4 MiB punched: image uses {} -> {}, range reads back as zeros",
            format_size(used1.saturating_sub(used0)),
            format_size(used2.saturating_sub(used0))
        );
    } else {
        println!("guest discard:   not offered by this file system");
    }

    // 7. What the backend counted, then a clean detach as libxl does it.
    for s in backend.status() {
        println!(
            "backend status:  dom{} dev {} {:?}: {} requests ({} reads, {} writes, {} flushes, {} discards), {} errors, {} fdatasync(s)",
            s.domid, s.devid, s.state, s.requests, s.reads, s.writes, s.flushes, s.discards, s.errors, s.fdatasyncs
        );
    }
    let anomalies = fe.anomalies();
    fe.disconnect().map_err(fail("disconnect"))?;
    ts.remove_vbd(&vbd).map_err(fail("remove the vbd"))?;
    ts.destroy_domain(DOMID)
        .map_err(fail("destroy the domain"))?;
    println!(
        "detach:          frontend closed, backend closed, vbd removed; protocol anomalies seen by the guest: {}",
        if anomalies.is_clean() { "none" } else { "SOME (see RUST_LOG=debug)" }
    );
    Ok(())
}

/// Removes the demo's own temporary directory.
/// Submit `n` operations keeping 32 in flight, waiting for each to succeed.
fn run_queued(
    fe: &mut Frontend,
    n: usize,
    mut submit: impl FnMut(usize, &mut Frontend) -> io::Result<refblk_sim::frontend::Tag>,
) -> CliResult {
    let mut next = 0usize;
    let mut in_flight = 0usize;
    while next < n || in_flight > 0 {
        while next < n && in_flight < 32 {
            submit(next, fe).map_err(fail("submit"))?;
            next += 1;
            in_flight += 1;
        }
        for c in fe
            .wait(std::time::Duration::from_secs(20))
            .map_err(fail("wait"))?
        {
            in_flight -= 1;
            c.into_result().map_err(fail("I/O"))?;
        }
    }
    Ok(())
}

fn xs_clone(sim: &SimXen) -> Result<refblk_core::xenstore::XsClient, CliError> {
    refblk_core::xenstore::XsClient::connect_unix(&sim.xenstored_path())
        .map_err(|e| CliError::failed(format!("demo: xenstore: {e}")))
}
