//! The test kit, included by every test binary (`#[path = "../kit/mod.rs"]
//! mod kit;`): a simulated machine with a refblk backend and a toolstack
//! ([`Rig`]), images, an in-memory disk model; the test PRNG, data pattern and
//! scratch directory ([`data`]); leak counting ([`leak`]); hostile guests
//! ([`hostile`]); `refblk serve` as a child process ([`serve`]).
#![allow(dead_code, unused_imports)]

pub mod data;
pub mod hostile;
pub mod leak;
pub mod serve;
pub mod wait;

pub use data::{machine_dir, pattern, Rng};
pub use leak::{fds, threads};
pub use wait::{wait_until, HANG};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use refblk_core::backend::{AttachOptions, Backend, BackendConfig, BackendHandle, DeviceStatus};
use refblk_core::xenstore::XsClient;
use refblk_sim::frontend::{Frontend, FrontendOptions, Toolstack, Vbd, VbdSpec};
use refblk_sim::{SimGuest, SimXen};

pub const XVDA: u32 = 51712;
/// xvdb (202 << 8 | 1 << 4), the device id libxl gives a second disk.
pub const XVDB: u32 = 51728;
pub const LONG: Duration = Duration::from_secs(20);

/// A simulated machine running a refblk backend, with a toolstack.
pub struct Rig {
    pub ts: Toolstack,
    pub backend: BackendHandle,
    join: Option<JoinHandle<std::io::Result<()>>>,
    pub sim: SimXen,
    pub dir: tempfile::TempDir,
}

/// The backend pins io_uring registered buffers (4 MiB per queue, several
/// devices per test): root, or a locked-memory limit of at least 256 MiB.
/// Applies the project's skip rule otherwise; false means skip.
pub fn require_memlock_or_skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_string));
    match soft.as_deref() {
        Some("unlimited") => true,
        Some(n) if n.parse::<u64>().is_ok_and(|n| n >= 256 << 20) => true,
        other => refblk_sim::scratchfs::skip_or_fail(&format!(
            "the backend's io_uring registered buffers need root or RLIMIT_MEMLOCK >= 256 MiB (soft limit: {})",
            other.unwrap_or("unknown")
        )),
    }
}

impl Rig {
    /// A machine with a default backend, or None when skipping (see
    /// [`require_memlock_or_skip`]).
    pub fn new() -> Option<Rig> {
        Rig::with_config(BackendConfig::default())
    }

    pub fn with_config(cfg: BackendConfig) -> Option<Rig> {
        if !require_memlock_or_skip() {
            return None;
        }
        let _ = env_logger::builder()
            .is_test(true)
            .format_timestamp_millis()
            .try_init();
        let dir = machine_dir();
        let sim = SimXen::start(dir.path()).expect("start the simulated Xen");
        let platform = Arc::new(sim.platform().expect("sim platform"));
        let (backend, join) = Backend::spawn(platform, cfg).expect("spawn the backend");
        let xs = XsClient::connect_unix(&sim.xenstored_path()).expect("toolstack xenstore");
        let ts = Toolstack::new(xs, backend.clone());
        Some(Rig {
            ts,
            backend,
            join: Some(join),
            sim,
            dir,
        })
    }

    /// A guest domain with `pages` pages of memory and its xenstore directory.
    pub fn guest(&self, domid: u16, pages: u32) -> Arc<SimGuest> {
        self.ts.create_domain(domid).expect("create domain");
        Arc::new(self.sim.create_guest(domid, pages).expect("create guest"))
    }

    /// Create the vbd and attach `image` (the hotplug step).
    pub fn attach(
        &self,
        domid: u16,
        devid: u32,
        image: &Path,
        mode: &str,
        opts: AttachOptions,
    ) -> Vbd {
        let mut spec = VbdSpec::new(domid, devid, image);
        spec.mode = mode.into();
        spec.attach = opts;
        self.ts.add_vbd(&spec).expect("add vbd")
    }

    pub fn connect(&self, guest: &Arc<SimGuest>, devid: u32, opts: FrontendOptions) -> Frontend {
        Frontend::connect(&self.sim.xenstored_path(), guest.clone(), devid, opts)
            .expect("frontend connect")
    }

    /// The backend's status of one device.
    pub fn status(&self, domid: u16, devid: u32) -> DeviceStatus {
        self.backend
            .status()
            .into_iter()
            .find(|s| s.domid == domid && s.devid == devid)
            .expect("device known to the backend")
    }

    /// The backend's status of the device at `backend_path` (any kind), if
    /// it has it.
    pub fn status_at(&self, backend_path: &str) -> Option<DeviceStatus> {
        self.backend
            .status()
            .into_iter()
            .find(|s| s.backend_path == backend_path)
    }

    /// Stop the backend and check that its thread ended cleanly.
    pub fn shutdown(mut self) {
        self.backend.stop();
        if let Some(j) = self.join.take() {
            j.join().expect("backend thread").expect("backend run");
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.backend.stop();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// A sparse image of `size` bytes in `dir`.
pub fn make_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create image");
    f.set_len(size).expect("size image");
    p
}

/// Run `ops` random reads and writes, up to `qd` in flight, of up to
/// `max_sectors` each, over the first `disk_bytes` of the disk, checking
/// every read against an in-memory model. Writes and reads in flight never
/// overlap, so the model is exact. Returns the number of ring requests and
/// the model (what the disk must hold).
pub fn random_rw(
    fe: &mut Frontend,
    seed: u64,
    ops: usize,
    qd: usize,
    max_sectors: u64,
    disk_bytes: u64,
) -> (usize, Vec<u8>) {
    random_io(fe, seed, ops, qd, max_sectors, disk_bytes, false)
}

/// Like [`random_rw`], with discards (which must read back as zeros) and
/// flushes mixed in.
pub fn random_io(
    fe: &mut Frontend,
    seed: u64,
    ops: usize,
    qd: usize,
    max_sectors: u64,
    disk_bytes: u64,
    mixed: bool,
) -> (usize, Vec<u8>) {
    use refblk_sim::frontend::IoRequest;
    use std::collections::HashMap;
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; disk_bytes as usize];
    // Start from what the disk holds.
    let chunk = 1 << 20;
    let mut off = 0usize;
    while off < model.len() {
        let n = chunk.min(model.len() - off);
        let d = fe.read((off / 512) as u64, n).expect("initial read");
        model[off..off + n].copy_from_slice(&d);
        off += n;
    }
    let nsect = disk_bytes / 512;
    let nq = fe.num_queues();
    // tag -> (sector, len, Some(expected data) for reads | None for writes)
    let mut inflight: HashMap<u64, (u64, usize, bool)> = HashMap::new();
    let mut ring_requests = 0usize;
    let mut issued = 0;
    let overlaps = |inflight: &HashMap<u64, (u64, usize, bool)>, s: u64, n: u64| {
        inflight.values().any(|&(s2, l2, _)| {
            let n2 = l2 as u64 / 512;
            s < s2 + n2 && s2 < s + n
        })
    };
    while issued < ops || !inflight.is_empty() {
        while issued < ops && inflight.len() < qd {
            let n = 1 + rng.below(max_sectors);
            let s = rng.below(nsect - n + 1);
            if overlaps(&inflight, s, n) {
                break;
            }
            let len = (n * 512) as usize;
            let q = Some(issued % nq);
            let roll = if mixed {
                rng.below(20)
            } else {
                10 + rng.below(2)
            };
            let can_discard = fe.info().is_some_and(|i| i.discard);
            if roll < 2 && can_discard {
                let t = fe
                    .submit(
                        q,
                        IoRequest::Discard {
                            sector: s,
                            nr_sectors: n,
                            secure: false,
                        },
                    )
                    .expect("submit discard");
                model[(s * 512) as usize..(s * 512) as usize + len].fill(0);
                inflight.insert(t.0, (s, len, false));
                issued += 1;
                continue;
            }
            if roll == 2 {
                let t = fe.submit(q, IoRequest::Flush).expect("submit flush");
                inflight.insert(t.0, (0, 0, false));
                issued += 1;
                continue;
            }
            submit_rw(
                fe,
                &mut rng,
                q,
                s,
                len,
                roll % 2 == 0,
                &mut model,
                &mut inflight,
            );
            issued += 1;
        }
        for c in fe.wait(LONG).expect("completions") {
            let (s, len, is_read) = inflight.remove(&c.tag.0).expect("completion of ours");
            ring_requests += c.ring_requests;
            assert_eq!(c.status, 0, "request at sector {s} len {len} failed");
            if is_read {
                let want = &model[(s * 512) as usize..(s * 512) as usize + len];
                if c.data != want {
                    let pos = c.data.iter().zip(want).position(|(a, b)| a != b).unwrap();
                    panic!("read of {len} bytes at sector {s}: first difference at byte {pos}");
                }
            }
        }
    }
    // Everything written is on the disk.
    let mut off = 0usize;
    while off < model.len() {
        let n = chunk.min(model.len() - off);
        let d = fe.read((off / 512) as u64, n).expect("final read");
        assert!(
            d == model[off..off + n],
            "final read at byte {off} differs from the model"
        );
        off += n;
    }
    (ring_requests, model)
}

/// Submit a random-data write (recorded in `model`) or a read of `len` bytes at
/// sector `s`, and remember it in `inflight` as (sector, len, is_read).
#[allow(clippy::too_many_arguments)]
pub fn submit_rw(
    fe: &mut Frontend,
    rng: &mut Rng,
    q: Option<usize>,
    s: u64,
    len: usize,
    write: bool,
    model: &mut [u8],
    inflight: &mut std::collections::HashMap<u64, (u64, usize, bool)>,
) {
    use refblk_sim::frontend::IoRequest;
    let t = if write {
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        let t = fe
            .submit(
                q,
                IoRequest::Write {
                    sector: s,
                    data: &data,
                },
            )
            .expect("submit write");
        model[(s * 512) as usize..(s * 512) as usize + len].copy_from_slice(&data);
        t
    } else {
        fe.submit(q, IoRequest::Read { sector: s, len })
            .expect("submit read")
    };
    inflight.insert(t.0, (s, len, !write));
}

/// A well-behaved guest (domid `domid`, a 4 MiB disk) running `ops` verified
/// random reads and writes in a thread; join returns the frontend and the
/// model of its disk. The hostile-guest tests run one beside each hostile one.
pub fn good_guest(
    rig: &Rig,
    dir: &Path,
    domid: u16,
    seed: u64,
    ops: usize,
) -> (PathBuf, JoinHandle<(Frontend, Vec<u8>)>) {
    const DISK: u64 = 4 << 20;
    let img = make_image(dir, &format!("good{domid}.img"), DISK);
    let guest = rig.guest(domid, 8192);
    rig.attach(domid, XVDA, &img, "w", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    let worker = std::thread::spawn(move || {
        let (_, model) = random_rw(&mut fe, seed, ops, 16, 64, DISK);
        (fe, model)
    });
    (img, worker)
}

/// Join a [`good_guest`]: it saw no error and no anomaly, stayed Connected,
/// and its image file is its model.
pub fn check_good_guest(
    rig: &Rig,
    domid: u16,
    img: &Path,
    worker: std::thread::JoinHandle<(Frontend, Vec<u8>)>,
) {
    let (mut good, model) = worker.join().expect("the good guest's verified I/O");
    assert_eq!(
        good.backend_state().unwrap(),
        xen_sys::xenbus::XenbusState::Connected
    );
    assert!(good.anomalies().is_clean(), "{:?}", good.anomalies());
    assert_eq!(rig.status(domid, XVDA).errors, 0);
    good.disconnect().unwrap();
    assert!(
        std::fs::read(img).unwrap() == model,
        "the good guest's image {} differs from its model",
        img.display()
    );
}

/// A Qubes-style pool in `parent/pool` (no file-system setup check) with one
/// origin volume `vid` of `size` bytes keeping `revisions` revisions; returns
/// the pool directory.
pub fn pool_with_volume(parent: &Path, vid: &str, revisions: i64, size: u64) -> PathBuf {
    use refblk_core::pool::{InitOptions, Pool, VolumeConfig};
    let dir = parent.join("pool");
    let pool = Pool::init(
        &dir,
        &InitOptions {
            setup_check: false,
            ..InitOptions::default()
        },
    )
    .expect("pool init");
    pool.create_volume(vid, VolumeConfig::origin(revisions), size)
        .expect("create volume");
    dir
}
