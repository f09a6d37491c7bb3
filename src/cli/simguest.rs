//! `refblk sim guest`: a simulated guest with a live workload on a running
//! `refblk sim` + `refblk serve --sim`, so that `refblk status` and `refblk
//! limit` can be watched acting on real I/O without Xen.
//!
//! It does what xl and a guest's blkfront do: creates the domain in the
//! simulated xenstore (with a name), adds a vbd whose hotplug step asks the
//! daemon on its control socket to serve the image, connects a frontend and
//! runs random 4 KiB I/O until SIGINT/SIGTERM or `--seconds`. With
//! `--verify` every written block carries a pattern of (block, generation)
//! and every read of a block this run wrote is checked against it; a
//! mismatch stops the guest with exit code 1. On exit it disconnects and
//! removes the vbd and the domain.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CliError, CliResult};
use refblk_core::xenstore::XsClient;
use refblk_sim::frontend::{Frontend, FrontendOptions, IoRequest, Toolstack, VbdSpec};
use refblk_sim::SimGuest;

/// What the guest does.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Random 4 KiB reads and writes, half each.
    Randrw,
    /// Random 4 KiB reads.
    Randread,
    /// Random 4 KiB writes.
    Randwrite,
}

/// Arguments of `refblk sim guest`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Needs a running `refblk sim --dir DIR` and `refblk serve --sim DIR`. Prints \
one line per second (IOPS, MiB/s, verified blocks); watch it from another \
terminal with `refblk status --watch --control DIR/refblk.sock` and slow it \
down with `refblk limit NAME --iops 200 --control DIR/refblk.sock`.")]
pub struct GuestArgs {
    /// The simulated machine's directory.
    #[arg(long, value_name = "DIR", env = "REFBLK_SIM")]
    pub sim: PathBuf,
    /// The daemon's control socket. Default: DIR/refblk.sock.
    #[arg(long, value_name = "PATH", env = "REFBLK_CONTROL")]
    pub control: Option<PathBuf>,
    /// The disk: an image file (created, sparse, with --size when missing),
    /// or pool:DIR:VID, a volume of the reflink pool in DIR, which the daemon
    /// starts (snapshots) on attach and stops (commits, or discards for a
    /// snapshot or volatile volume) on detach, as for an xl disk line with
    /// target=pool:DIR:VID.
    #[arg(long, value_name = "IMAGE|pool:DIR:VID")]
    pub disk: PathBuf,
    /// Size of a created image, e.g. 64M, 1G (not for a pool volume: it has
    /// its own size).
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub size: String,
    /// The guest's domain id (default: the first free one from 1).
    #[arg(long)]
    pub domid: Option<u16>,
    /// The guest's name in xenstore (default: guest<DOMID>).
    #[arg(long)]
    pub name: Option<String>,
    /// What the guest does.
    #[arg(long, value_enum, default_value = "randrw")]
    pub workload: Workload,
    /// Check every read of a block this guest wrote.
    #[arg(long)]
    pub verify: bool,
    /// Requests in flight.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=128))]
    pub qd: u32,
    /// Stop after S seconds (0: run until SIGINT/SIGTERM).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seconds: u64,
}

const BLOCK: usize = 4096;
const DEVID: u32 = 51712; // xvda

/// The bytes of block `b` at generation `g`.
fn pattern(b: u64, g: u32) -> Vec<u8> {
    let mut x =
        b.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(g).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut v = Vec::with_capacity(BLOCK);
    while v.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

fn fail(what: &'static str) -> impl Fn(std::io::Error) -> CliError {
    move |e| CliError::failed(format!("sim guest: {what}: {e}"))
}

/// The image file of `--disk`, created with `--size` when missing.
fn image(a: &GuestArgs) -> Result<PathBuf, CliError> {
    if !a.disk.exists() {
        let size = refblk_core::util::size::parse_size(&a.size)
            .map_err(|e| CliError::usage(format!("--size {}: {e}", a.size)))?;
        let f = std::fs::File::create(&a.disk).map_err(fail("create the image"))?;
        f.set_len(size).map_err(fail("size the image"))?;
        println!("created {} ({size} bytes)", a.disk.display());
    }
    std::fs::canonicalize(&a.disk).map_err(fail("image"))
}

/// Run `refblk sim guest`.
pub fn run(a: GuestArgs) -> CliResult {
    super::signals::block_terminate().map_err(fail("blocking signals"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    super::signals::on_terminate(move || s2.store(true, Ordering::Release))
        .map_err(fail("signal handler"))?;
    let control = a
        .control
        .clone()
        .unwrap_or_else(|| a.sim.join("refblk.sock"));
    let xs_path = a.sim.join("xenstored.sock");
    let xs = XsClient::connect_unix(&xs_path).map_err(|e| {
        CliError::failed(format!(
            "sim guest: {}: {e} (start `refblk sim --dir {}` first)",
            xs_path.display(),
            a.sim.display()
        ))
    })?;
    if !control.exists() {
        return Err(CliError::failed(format!(
            "sim guest: {}: no daemon (start `refblk serve --sim {}` first)",
            control.display(),
            a.sim.display()
        )));
    }
    // The image, or the pool volume (its directory absolute: the daemon
    // resolves it, not this process).
    let volume = refblk_sim::frontend::pool_target(&a.disk);
    let disk = if let Some((pool, vid)) = volume {
        let dir = std::fs::canonicalize(pool).map_err(|e| {
            CliError::failed(format!(
                "sim guest: --disk {}: pool directory {pool}: {e} (create the pool with `refblk pool init {pool}` and the volume with `refblk volume create -p {pool} {vid} --size SIZE`)",
                a.disk.display()
            ))
        })?;
        PathBuf::from(format!("pool:{}:{vid}", dir.display()))
    } else {
        image(&a)?
    };

    let ts = Toolstack::with_control_socket(xs, &control);
    // The guest's memory claims the domain id: several `sim guest`s started
    // at once each find a free id (one that loses the race to another moves
    // on to the next).
    let pages = 2048 + 64 * a.qd;
    let (domid, guest) = match a.domid {
        Some(d) => (
            d,
            SimGuest::create(&a.sim, d, pages).map_err(fail("guest memory"))?,
        ),
        None => {
            let mut found = None;
            for d in 1..u16::MAX {
                let taken = |d: u16| {
                    ts.xs()
                        .read_string(0, &format!("/local/domain/{d}/name"))
                        .is_ok()
                        || a.sim.join("dom").join(d.to_string()).exists()
                };
                if taken(d) {
                    continue;
                }
                match SimGuest::create(&a.sim, d, pages) {
                    Ok(g) => {
                        found = Some((d, g));
                        break;
                    }
                    Err(_) if taken(d) => continue,
                    Err(e) => return Err(fail("guest memory")(e)),
                }
            }
            found.ok_or_else(|| CliError::failed("sim guest: no free domain id"))?
        }
    };
    let guest = Arc::new(guest);
    let name = a.name.clone().unwrap_or_else(|| format!("guest{domid}"));
    ts.create_domain(domid).map_err(fail("create the domain"))?;
    ts.xs()
        .write(0, &format!("/local/domain/{domid}/name"), name.as_bytes())
        .map_err(|e| CliError::failed(format!("sim guest: name: {e}")))?;
    let result = run_guest(&a, &ts, guest, &name, &disk, &stop);
    let _ = ts.destroy_domain(domid);
    result
}

fn run_guest(
    a: &GuestArgs,
    ts: &Toolstack,
    guest: Arc<SimGuest>,
    name: &str,
    disk: &std::path::Path,
    stop: &AtomicBool,
) -> CliResult {
    let domid = guest.domid();
    let vbd = ts
        .add_vbd(&VbdSpec::new(domid, DEVID, disk))
        .map_err(fail("add the vbd (hotplug through the control socket)"))?;
    let mut fe = Frontend::connect(
        &a.sim.join("xenstored.sock"),
        guest,
        DEVID,
        FrontendOptions::default(),
    )
    .map_err(fail("frontend connect"))?;
    let info = fe
        .info()
        .cloned()
        .ok_or_else(|| CliError::failed("sim guest: no disk info"))?;
    let blocks = info.sectors * u64::from(info.sector_size) / BLOCK as u64;
    if blocks == 0 {
        return Err(CliError::failed(
            "sim guest: the disk is smaller than 4 KiB",
        ));
    }
    println!(
        "guest {name} (dom{domid}) xvda -> {}: {} MiB, {:?} workload, qd {}{}; stop with Ctrl-C",
        disk.display(),
        (blocks * BLOCK as u64) >> 20,
        a.workload,
        a.qd,
        if a.verify { ", verifying" } else { "" }
    );
    let r = workload(a, &mut fe, blocks, stop);
    let _ = fe.disconnect();
    let _ = ts.remove_vbd(&vbd);
    r
}

fn workload(a: &GuestArgs, fe: &mut Frontend, blocks: u64, stop: &AtomicBool) -> CliResult {
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
    // splitmix64: consecutive outputs are independent (a bare xorshift's
    // low bits are not, which made the read/write choice a function of the
    // block number).
    let mut next = move || {
        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let start = Instant::now();
    let end = (a.seconds > 0).then(|| start + Duration::from_secs(a.seconds));
    // block -> generation this run wrote (absent: never written, not checked).
    let mut gens: HashMap<u64, u32> = HashMap::new();
    // tag -> (block, Some(generation) of a write | None for a read)
    let mut inflight: HashMap<u64, (u64, Option<u32>)> = HashMap::new();
    let (mut done, mut bytes, mut verified, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let (mut last, mut last_done, mut last_bytes) = (start, 0u64, 0u64);
    let nq = fe.num_queues().max(1);
    let mut issued = 0usize;
    loop {
        let finishing = stop.load(Ordering::Acquire) || end.is_some_and(|e| Instant::now() >= e);
        while !finishing && inflight.len() < a.qd as usize {
            let b = next() % blocks;
            if inflight.values().any(|&(x, _)| x == b) {
                break;
            }
            let write = match a.workload {
                Workload::Randread => false,
                Workload::Randwrite => true,
                Workload::Randrw => next() & 1 == 0,
            };
            let sector = b * (BLOCK as u64 / 512);
            let q = Some(issued % nq);
            issued += 1;
            let (tag, what) = if write {
                let g = gens.get(&b).copied().unwrap_or(0) + 1;
                let data = pattern(b, g);
                let t = fe
                    .submit(
                        q,
                        IoRequest::Write {
                            sector,
                            data: &data,
                        },
                    )
                    .map_err(fail("submit"))?;
                (t, Some(g))
            } else {
                let t = fe
                    .submit(q, IoRequest::Read { sector, len: BLOCK })
                    .map_err(fail("submit"))?;
                (t, None)
            };
            inflight.insert(tag.0, (b, what));
        }
        if inflight.is_empty() && finishing {
            break;
        }
        for c in fe.wait(Duration::from_secs(60)).map_err(fail("wait"))? {
            let Some((b, what)) = inflight.remove(&c.tag.0) else {
                continue;
            };
            done += 1;
            bytes += BLOCK as u64;
            if c.status != 0 {
                errors += 1;
                eprintln!("sim guest: block {b}: error status {}", c.status);
                continue;
            }
            match what {
                Some(g) => {
                    gens.insert(b, g);
                }
                None if a.verify => {
                    if let Some(&g) = gens.get(&b) {
                        if c.data != pattern(b, g) {
                            return Err(CliError::failed(format!(
                                "sim guest: VERIFY FAILED: block {b} does not hold what generation {g} wrote"
                            )));
                        }
                        verified += 1;
                    }
                }
                None => {}
            }
        }
        let now = Instant::now();
        if now.duration_since(last) >= Duration::from_secs(1) {
            let dt = now.duration_since(last).as_secs_f64();
            println!(
                "{:6.1} s  {:8.0} IOPS  {:7.1} MiB/s  {} verified reads  {} errors",
                now.duration_since(start).as_secs_f64(),
                (done - last_done) as f64 / dt,
                (bytes - last_bytes) as f64 / dt / (1u64 << 20) as f64,
                verified,
                errors
            );
            (last, last_done, last_bytes) = (now, done, bytes);
        }
    }
    println!(
        "done: {done} requests in {:.1} s, {verified} reads verified, {errors} errors",
        start.elapsed().as_secs_f64()
    );
    if errors > 0 {
        return Err(CliError::failed(format!(
            "sim guest: {errors} requests failed"
        )));
    }
    Ok(())
}
