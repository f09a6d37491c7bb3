//! The hostile guests of issue 7 as building blocks, shared by the tests
//! (`datapath_hostile*.rs`, which add their own assertions around them) and
//! by the neighbour benchmark (`bench/neighbour.rs`, which runs each one in a
//! loop beside a well-behaved guest and measures that guest).
//!
//! Every function here acts through the frontend's hostile API
//! ([`Frontend::raw_push`] and friends) and the guest's grant table; none of
//! it asserts anything about the backend except what a step cannot go on
//! without (a panic there is a test failure, as before the move).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use refblk_core::platform::GrantRef;
use refblk_sim::frontend::wire::{self, Seg};
use refblk_sim::frontend::{Frontend, FrontendOptions, IoRequest, Protocol};
use refblk_sim::SimGuest;
use xen_sys::xenbus::XenbusState;

use super::{Rng, LONG};

/// The ways a guest misbehaves (issue 7), for loops over all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Fill the ring with valid reads, then keep re-publishing the producer
    /// index and kicking without consuming a response for a while.
    Flood,
    /// Disconnect and reconnect in a tight loop.
    ReconnectLoop,
    /// Submit 64 KiB writes and end the grants of half of them while they
    /// are in flight.
    RevokeMidRequest,
    /// Fill the ring with random slot bytes (honest producer index), as fast
    /// as the backend answers.
    Garbage,
    /// End access to the ring pages while the backend maps them (refused),
    /// clear the grant entries anyway and reuse the pages for random data:
    /// the backend sees a bogus ring and disconnects; reconnect, repeat.
    RingUnmap,
    /// Reconnect with the other `protocol` (x86_64 <-> x86_32) every time.
    ProtocolSwitch,
}

impl Misbehaviour {
    pub const ALL: [Misbehaviour; 6] = [
        Misbehaviour::Flood,
        Misbehaviour::ReconnectLoop,
        Misbehaviour::RevokeMidRequest,
        Misbehaviour::Garbage,
        Misbehaviour::RingUnmap,
        Misbehaviour::ProtocolSwitch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Misbehaviour::Flood => "flood, never consume",
            Misbehaviour::ReconnectLoop => "reconnect loop",
            Misbehaviour::RevokeMidRequest => "revoke grants mid-request",
            Misbehaviour::Garbage => "garbage requests",
            Misbehaviour::RingUnmap => "ring unmap + reuse",
            Misbehaviour::ProtocolSwitch => "protocol switch",
        }
    }
}

/// What happened to the hostile guest's own device.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// Rounds of misbehaviour done.
    pub rounds: u64,
    /// Responses with status OKAY / anything else.
    pub ok: u64,
    pub errors: u64,
    /// Times the backend closed the device on its own.
    pub disconnected: u64,
    /// Connections made (reconnects included).
    pub connects: u64,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rounds, {} ok, {} errors, {} disconnected by the backend, {} connects",
            self.rounds, self.ok, self.errors, self.disconnected, self.connects
        )
    }
}

// ------------------------------------------------------------------ flood

/// A ring's worth of valid one-page reads, pushed and published.
pub struct Flood {
    /// The request ids.
    pub ids: HashSet<u64>,
    /// (data frame, sector) of each read.
    pub reads: Vec<(u32, u64)>,
    /// The data pages' grants (end them with [`end_flood`]).
    pub grefs: Vec<GrantRef>,
    /// The producer index published.
    pub req_prod: u32,
}

/// Fill ring 0 with one-page reads (ids `round << 32 | i`, consecutive 4 KiB
/// blocks from `8 * round * ring size`, wrapping at the end of the disk) and
/// publish them. The caller keeps the ring full as long as it likes.
pub fn flood_ring(fe: &mut Frontend, round: u64) -> Flood {
    let info = fe.info().expect("connected").clone();
    let (_, size) = fe.raw_ring_state(0).expect("ring 0");
    let blocks = info.sectors / 8;
    let mut f = Flood {
        ids: HashSet::new(),
        reads: Vec::new(),
        grefs: Vec::new(),
        req_prod: 0,
    };
    for i in 0..size as u64 {
        let (frame, gref) = fe.raw_grant_page(&[0u8; 4096], false).unwrap();
        let id = (round << 32) | i;
        let sector = 8 * ((round * size as u64 + i) % blocks);
        let mut slot = fe.raw_slot();
        let s = Seg {
            gref,
            first_sect: 0,
            last_sect: 7,
        };
        wire::encode_rw(info.abi, &mut slot, wire::OP_READ, 1, 0, id, sector, &[s]);
        fe.raw_push(0, id, &slot).unwrap();
        f.ids.insert(id);
        f.reads.push((frame, sector));
        f.grefs.push(gref);
    }
    fe.raw_publish(0).unwrap();
    f.req_prod = fe.raw_ring_state(0).unwrap().0;
    f
}

/// Give the flood's data pages back (their reads must be answered).
pub fn end_flood(fe: &Frontend, f: &Flood) {
    for (g, (frame, _)) in f.grefs.iter().zip(&f.reads) {
        assert!(fe.guest().end_access(*g).unwrap(), "grant still mapped");
        fe.guest().free_page(*frame).unwrap();
    }
}

// ------------------------------------------------------------ revocation

/// Submit 24 writes of 64 KiB from `first_sector` on and end the grants of
/// every second one while they are in flight; wait for all. Returns (OKAY,
/// ERROR) counts; any other status panics (the backend must answer a
/// revoked grant with an error, or OKAY if it copied before).
pub fn revoke_mid_request(fe: &mut Frontend, first_sector: u64) -> (u64, u64) {
    let data = vec![0x5au8; 64 * 1024];
    let tags: Vec<_> = (0..24u64)
        .map(|i| {
            fe.submit(
                None,
                IoRequest::Write {
                    sector: first_sector + 128 * i,
                    data: &data,
                },
            )
            .expect("submit")
        })
        .collect();
    for t in tags.iter().step_by(2) {
        fe.revoke_grants(*t);
    }
    let (mut ok, mut err) = (0, 0);
    for t in tags {
        let c = fe.wait_for(t, LONG).expect("answer after revocation");
        match c.status {
            wire::RSP_OKAY => ok += 1,
            wire::RSP_ERROR => err += 1,
            s => panic!("status {s} for a write with revoked grants"),
        }
    }
    (ok, err)
}

// ---------------------------------------------------------------- garbage

/// Fill ring 0 with slots of random bytes (each with its own id, so that
/// the responses can be matched) and publish them with an honest producer
/// index. Returns the number of slots pushed; every one must be answered
/// exactly once (collect with `wait_raw_responses`).
pub fn garbage_ring(fe: &mut Frontend, rng: &mut Rng) -> usize {
    let abi = fe.info().expect("connected").abi;
    let (pvt, size) = fe.raw_ring_state(0).expect("ring 0");
    let mut n = 0;
    for i in 0..size {
        let mut slot = fe.raw_slot();
        rng.fill(&mut slot);
        // Mostly valid operation codes, so that the parser goes deep.
        if rng.below(4) != 0 {
            slot[0] = rng.below(7) as u8;
        }
        let id = (3u64 << 60) | (u64::from(pvt.wrapping_add(i)) << 8) | rng.below(256);
        let o = abi.id_offset();
        slot[o..o + 8].copy_from_slice(&id.to_le_bytes());
        if fe.raw_push(0, id, &slot).is_err() {
            break;
        }
        n += 1;
    }
    fe.raw_publish(0).unwrap();
    n
}

// ------------------------------------------------------------- ring unmap

/// What a guest does with its ring pages after trying to take them back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingReuse {
    /// Freed and handed out again zeroed (a zeroing page allocator).
    Zeroed,
    /// Reused for other data: random bytes, written again and again.
    Garbage(u64),
    /// Ballooned out: the guest never touches it again (on Xen the backend's
    /// mapping keeps the frame; the guest loses it).
    Frozen,
}

/// What [`abandon_ring`] saw.
#[derive(Debug, Clone, Default)]
pub struct Abandoned {
    /// Ring grants whose `end_access` was refused (still mapped by the
    /// backend), of `of`.
    pub end_access_refused: usize,
    pub of: usize,
    /// (first frame, pages) of the ring.
    pub pages: (u32, u32),
    pub grefs: Vec<GrantRef>,
}

/// Play a guest that unmaps its ring while connected: `end_access` on every
/// ring grant (Xen refuses while the backend maps it, and Linux then leaks
/// the page), clear the grant entries anyway (a hostile guest writes its
/// own grant table), then reuse the pages as `reuse` says and kick the
/// backend.
pub fn abandon_ring(fe: &Frontend, queue: usize, reuse: RingReuse) -> Abandoned {
    let (first, n, grefs) = fe.raw_ring_pages(queue).expect("ring");
    let guest = fe.guest();
    let mut refused = 0;
    for g in &grefs {
        if !guest.end_access(*g).expect("end_access of a ring grant") {
            refused += 1;
        }
        guest.set_grant_entry_raw(*g, 0, 0, 0).unwrap();
    }
    match reuse {
        RingReuse::Zeroed => guest
            .write_page(first, 0, &vec![0u8; n as usize * 4096])
            .unwrap(),
        RingReuse::Garbage(seed) => scribble(guest, first, n, seed),
        RingReuse::Frozen => {}
    }
    fe.notify(queue).unwrap();
    Abandoned {
        end_access_refused: refused,
        of: grefs.len(),
        pages: (first, n),
        grefs,
    }
}

/// Overwrite `n` pages from `first` with random bytes.
pub fn scribble(guest: &SimGuest, first: u32, n: u32, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; n as usize * 4096];
    rng.fill(&mut buf);
    guest.write_page(first, 0, &buf).unwrap();
}

/// Wait until the backend has left Connected (Closing or Closed) for this
/// device.
pub fn wait_disconnected(fe: &Frontend, timeout: Duration) -> std::io::Result<XenbusState> {
    fe.wait_backend_state(
        |s| matches!(s, XenbusState::Closing | XenbusState::Closed),
        timeout,
    )
}

// --------------------------------------------------------------- protocol

/// After a disconnect, go back to Initialising (as a rebooted guest's
/// blkfront does) and wait for the backend's fresh InitWait, so a new
/// [`Frontend::connect`] with other options can take over.
pub fn back_to_initialising(fe: &Frontend) {
    let p = format!("{}/state", fe.frontend_path());
    fe.xs()
        .write(0, &p, b"1")
        .unwrap_or_else(|e| panic!("write {p}: {e:?}"));
    fe.wait_backend_state(|s| s == XenbusState::InitWait, LONG)
        .expect("backend back in InitWait");
}

// ------------------------------------------------------------ whole loops

/// A hostile guest that can run any [`Misbehaviour`] in a loop, reconnecting
/// whenever the backend throws it out (it keeps trying, as a hostile guest
/// would).
pub struct HostileGuest {
    pub fe: Option<Frontend>,
    xenstored: PathBuf,
    guest: Arc<SimGuest>,
    devid: u32,
    protocol: Protocol,
    rng: Rng,
    pub outcome: Outcome,
}

impl HostileGuest {
    pub fn connect(xenstored: &Path, guest: Arc<SimGuest>, devid: u32, seed: u64) -> Self {
        let fe = Frontend::connect(xenstored, guest.clone(), devid, FrontendOptions::default())
            .expect("hostile guest connects");
        HostileGuest {
            fe: Some(fe),
            xenstored: xenstored.to_path_buf(),
            guest,
            devid,
            protocol: Protocol::X86_64,
            rng: Rng::new(seed),
            outcome: Outcome {
                connects: 1,
                ..Outcome::default()
            },
        }
    }

    fn fe(&mut self) -> &mut Frontend {
        self.fe.as_mut().expect("connected")
    }

    /// Close (whatever state the backend is in) and connect again with the
    /// current protocol.
    fn cycle(&mut self, new_frontend: bool) {
        let mut fe = self.fe.take().expect("frontend");
        let _ = fe.disconnect();
        let fe = if new_frontend {
            back_to_initialising(&fe);
            drop(fe);
            let opts = FrontendOptions {
                protocol: self.protocol,
                ..Default::default()
            };
            Frontend::connect(&self.xenstored, self.guest.clone(), self.devid, opts)
                .expect("hostile guest reconnects")
        } else {
            fe.reconnect().expect("hostile guest reconnects");
            fe
        };
        self.fe = Some(fe);
        self.outcome.connects += 1;
    }

    /// If the backend closed the device, count it and reconnect.
    fn recover(&mut self) {
        let s = self.fe().backend_state().unwrap_or(XenbusState::Unknown);
        if s != XenbusState::Connected {
            self.outcome.disconnected += 1;
            self.cycle(false);
        }
    }

    /// One round of `m`.
    pub fn round(&mut self, m: Misbehaviour) {
        let round = self.outcome.rounds;
        self.outcome.rounds += 1;
        match m {
            Misbehaviour::Flood => {
                let f = flood_ring(self.fe(), round);
                // Keep it full for 50 ms, kicking all the time.
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(50) {
                    let fe = self.fe();
                    fe.raw_set_req_prod(0, f.req_prod).unwrap();
                    fe.notify(0).unwrap();
                    std::thread::sleep(Duration::from_micros(200));
                }
                let r = self.fe().wait_raw_responses(f.ids.len(), LONG).unwrap();
                self.count(r.iter().map(|x| x.status));
                end_flood(self.fe.as_ref().unwrap(), &f);
            }
            Misbehaviour::ReconnectLoop => {
                self.cycle(false);
                if round.is_multiple_of(3) {
                    let r = self.fe().write(8 * (round % 512), &[round as u8; 4096]);
                    self.count([if r.is_ok() { 0 } else { -1 }]);
                }
            }
            Misbehaviour::RevokeMidRequest => {
                let sectors = self.fe().info().unwrap().sectors;
                let first = (round * 24 * 128) % (sectors - 24 * 128);
                let (ok, err) = revoke_mid_request(self.fe(), first);
                self.outcome.ok += ok;
                self.outcome.errors += err;
            }
            Misbehaviour::Garbage => {
                let mut rng = Rng::new(self.rng.next());
                let n = garbage_ring(self.fe(), &mut rng);
                // A garbage slot cannot disconnect the device (only the
                // indices can); if it did, the recover below counts it.
                if let Ok(r) = self.fe().wait_raw_responses(n, Duration::from_secs(5)) {
                    self.count(r.iter().map(|x| x.status));
                }
                self.recover();
            }
            Misbehaviour::RingUnmap => {
                // Some I/O first, so that a zeroed ring is a step backwards.
                let r = self.fe().write(0, &[round as u8; 4096]);
                self.count([if r.is_ok() { 0 } else { -1 }]);
                let reuse = if round.is_multiple_of(2) {
                    RingReuse::Garbage(self.rng.next())
                } else {
                    RingReuse::Zeroed
                };
                abandon_ring(self.fe.as_ref().unwrap(), 0, reuse);
                let _ = wait_disconnected(self.fe.as_ref().unwrap(), LONG);
                self.recover();
            }
            Misbehaviour::ProtocolSwitch => {
                self.protocol = match self.protocol {
                    Protocol::X86_64 => Protocol::X86_32,
                    _ => Protocol::X86_64,
                };
                self.cycle(true);
                let r = self.fe().write(8, &[round as u8; 4096]);
                self.count([if r.is_ok() { 0 } else { -1 }]);
            }
        }
    }

    fn count(&mut self, statuses: impl IntoIterator<Item = i16>) {
        for s in statuses {
            if s == wire::RSP_OKAY {
                self.outcome.ok += 1;
            } else {
                self.outcome.errors += 1;
            }
        }
    }

    /// Rounds of `m` until `stop()` (at least one).
    pub fn run(&mut self, m: Misbehaviour, stop: &dyn Fn() -> bool) -> Outcome {
        loop {
            self.round(m);
            if stop() {
                return self.outcome;
            }
        }
    }

    /// Close the device for good.
    pub fn close(mut self) {
        if let Some(mut fe) = self.fe.take() {
            let _ = fe.disconnect();
        }
    }
}
