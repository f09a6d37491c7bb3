//! What a restarted `refblk serve` needs to take over live rings: one state
//! file per connected device (JSON, written before the device goes
//! Connected) and one journal per queue (a small file mapped shared, updated
//! with plain stores on the request path). See `docs/restart.md`.
//!
//! The journal exists because in a blkif ring a response is written into the
//! slot at `rsp_prod_pvt`, which generally held some *other* request, possibly
//! still in flight: after a crash the ring no longer holds the requests that
//! were consumed but not answered. The journal keeps a copy of each of them
//! until its response is published.

use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{compiler_fence, Ordering};

use log::warn;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::blkif::{Abi, Features};
use crate::platform::DomId;

/// Default state directory on a real dom0 (tmpfs: it must not survive a reboot).
pub const DEFAULT_STATE_DIR: &str = "/run/refblk/state";

/// `"kind"` of a device state file.
const STATE_KIND: &str = "refblk-vbd-state";
/// Version of the device state file. Bump on any incompatible change.
pub const STATE_VERSION: u64 = 1;

/// Journal magic (8 bytes) and version.
const JOURNAL_MAGIC: &[u8; 8] = b"RBJRNL\0\0";
pub const JOURNAL_VERSION: u32 = 1;
const HDR_SIZE: usize = 64;
const ENTRY_SIZE: usize = 128;
/// Largest slot of any ABI (x86_64: 112 bytes).
const MAX_SLOT: usize = ENTRY_SIZE - 16;
// Header field offsets.
const H_VERSION: usize = 8;
const H_SLOT: usize = 12;
const H_ENTRIES: usize = 16;
const H_REQ_CONS: usize = 24;
const H_RSP_PROD: usize = 28;
// Entry field offsets.
const E_LIVE: usize = 0;
const E_RING_IDX: usize = 4;
const E_RSP_POS: usize = 8;
const E_ANSWERED: usize = 12;
const E_BYTES: usize = 16;

/// One queue of a device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub ring_refs: Vec<u32>,
    pub port: u32,
}

/// The pool volume a device serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRef {
    pub pool: PathBuf,
    pub vid: String,
}

/// Everything needed to rebuild a Connected device without a handshake.
/// Its file is this as JSON, after a `kind` and a `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub domid: DomId,
    pub devid: u32,
    pub backend: String,
    pub frontend: String,
    pub image: PathBuf,
    pub read_only: bool,
    pub sector_size: u32,
    pub volume: Option<VolumeRef>,
    /// Written as the `protocol` name (`x86_64-abi`).
    #[serde(rename = "protocol", with = "protocol_name")]
    pub abi: Abi,
    pub persistent: bool,
    pub sectors: u64,
    /// What the device advertised (written as `flush`, `barrier`,
    /// `discard`, `discard_secure`).
    #[serde(flatten)]
    pub features: Features,
    pub max_indirect_segments: u32,
    pub queues: Vec<QueueState>,
    /// The device's I/O limits when it connected (from the disk line, a
    /// volume's stored limits, or `refblk limit`); `None` = unlimited.
    /// Optional in the file (older files have none); written in its text
    /// form (`read-iops=500 burst=100ms`).
    #[serde(default, with = "limits_text")]
    pub limits: Option<crate::limits::Limits>,
}

/// A state file: a header that names the format, then the state.
#[derive(Serialize, Deserialize)]
struct StateFile<S> {
    kind: String,
    version: u64,
    #[serde(flatten)]
    state: S,
}

/// `Abi` as its xenstore protocol name.
mod protocol_name {
    use super::Abi;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &Abi, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(a.protocol_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Abi, D::Error> {
        let name = String::deserialize(d)?;
        Abi::from_protocol(Some(&name)).map_err(|e| D::Error::custom(format!("protocol: {e}")))
    }
}

/// Optional `Limits` in their text form.
mod limits_text {
    use crate::limits::Limits;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(l: &Option<Limits>, s: S) -> Result<S::Ok, S::Error> {
        match l {
            Some(l) => s.serialize_some(&l.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Limits>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| Limits::parse_list(&t).map_err(|e| D::Error::custom(format!("limits: {e}"))))
            .transpose()
    }
}

fn bad(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {why}", path.display()),
    )
}

impl DeviceState {
    /// The state file's JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(StateFile {
            kind: STATE_KIND.into(),
            version: STATE_VERSION,
            state: self,
        })
        .expect("a device state is plain data")
    }

    /// Read a state file's JSON (from `path`, for messages): refused unless
    /// it is a refblk device state of this version with at least one queue.
    pub fn from_json(path: &Path, v: &Value) -> io::Result<DeviceState> {
        if v["kind"] != STATE_KIND {
            return Err(bad(path, "not a refblk device state file"));
        }
        let version = v["version"].as_u64().unwrap_or(0);
        if version != STATE_VERSION {
            return Err(bad(
                path,
                format!("state version {version}, this refblk reads version {STATE_VERSION}"),
            ));
        }
        let f: StateFile<DeviceState> =
            serde_json::from_value(v.clone()).map_err(|e| bad(path, e))?;
        if f.state.queues.is_empty() {
            return Err(bad(path, "no queues"));
        }
        Ok(f.state)
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Use (and create, mode 0700) `dir`.
    pub fn open(dir: &Path) -> io::Result<StateDir> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn state_path(&self, domid: DomId, devid: u32) -> PathBuf {
        self.dir.join(format!("vbd-{domid}-{devid}.json"))
    }

    pub fn journal_path(&self, domid: DomId, devid: u32, queue: usize) -> PathBuf {
        self.dir
            .join(format!("vbd-{domid}-{devid}.q{queue}.journal"))
    }

    /// Write a device's state (temp file + rename: never half written).
    pub fn save(&self, st: &DeviceState) -> io::Result<()> {
        let p = self.state_path(st.domid, st.devid);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, st.to_json().to_string())
            .and_then(|()| std::fs::rename(&tmp, &p))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
    }

    /// Remove a device's state and journals.
    pub fn remove(&self, domid: DomId, devid: u32) {
        let p = self.state_path(domid, devid);
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!("{}: {e}", p.display());
            }
        }
        let prefix = format!("vbd-{domid}-{devid}.q");
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".journal") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Every device state file: `Ok(state)` or the error that makes it stale.
    pub fn list(&self) -> Vec<(PathBuf, io::Result<DeviceState>)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("vbd-") && name.ends_with(".json")) {
                continue;
            }
            let r = std::fs::read(&p)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
                .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| bad(&p, e)))
                .and_then(|v| DeviceState::from_json(&p, &v));
            out.push((p, r));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// A request that was consumed but whose response was not published when the
/// previous daemon stopped: to be executed again.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Journal entry holding it (kept live until its response is published).
    pub entry: u32,
    /// The ring index it was consumed at.
    pub ring_idx: u32,
    /// The slot bytes as copied out of the ring.
    pub bytes: Vec<u8>,
}

/// What a journal says about a ring after a restart.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub req_cons: u32,
    pub rsp_prod: u32,
    /// In consumption order.
    pub replay: Vec<Replay>,
}

/// The per-queue journal of consumed-but-unpublished requests: a file mapped
/// `MAP_SHARED`, so what the queue thread stored is in the page cache whatever
/// way the process ends. Layout in `docs/restart.md`.
pub struct Journal {
    path: PathBuf,
    map: std::ptr::NonNull<u8>,
    len: usize,
    slot_size: usize,
    entries: u32,
    free: Vec<u32>,
    /// Entries answered since the last publish (freed by `published`).
    answered: Vec<u32>,
    _file: File,
}

// SAFETY: the mapping is owned by the Journal (unmapped on drop) and only
// accessed through `&mut self` or `&self` methods of it; moving it to another
// thread moves that exclusive ownership.
unsafe impl Send for Journal {}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("entries", &self.entries)
            .finish()
    }
}

impl Journal {
    fn map_file(path: &Path, file: &File, len: usize) -> io::Result<std::ptr::NonNull<u8>> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let n = NonZeroUsize::new(len).expect("journal is never empty");
        // SAFETY: a fresh shared mapping of a file we opened read-write and
        // sized to `len`; nothing else in this process maps it. The file is on
        // a root-only state directory; another process writing it could only
        // change bytes we validate on recovery, not memory safety (we access
        // it as plain bytes).
        let p = unsafe {
            mmap(
                None,
                n,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file,
                0,
            )
        }
        .map_err(|e| io::Error::other(format!("{}: mmap: {e}", path.display())))?;
        Ok(p.cast())
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `map` is a live mapping of `len` bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), self.len) }
    }

    fn get32(&self, off: usize) -> u32 {
        let b = self.bytes();
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    fn put32(&mut self, off: usize, v: u32) {
        self.bytes_mut()[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn entry_off(i: u32) -> usize {
        HDR_SIZE + i as usize * ENTRY_SIZE
    }

    /// A fresh journal for a ring of `entries` slots of `abi` (replaces any
    /// old file), all indices at `start`.
    pub fn create(path: &Path, abi: Abi, entries: u32, start: u32) -> io::Result<Journal> {
        let len = HDR_SIZE + entries as usize * ENTRY_SIZE;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .and_then(|f| f.set_len(len as u64).map(|()| f))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let map = Self::map_file(path, &file, len)?;
        let mut j = Journal {
            path: path.to_path_buf(),
            map,
            len,
            slot_size: abi.slot_size(),
            entries,
            free: (0..entries).rev().collect(),
            answered: Vec::new(),
            _file: file,
        };
        j.put32(H_VERSION, JOURNAL_VERSION);
        j.put32(H_SLOT, abi.slot_size() as u32);
        j.put32(H_ENTRIES, entries);
        j.put32(H_REQ_CONS, start);
        j.put32(H_RSP_PROD, start);
        compiler_fence(Ordering::SeqCst);
        j.bytes_mut()[..8].copy_from_slice(JOURNAL_MAGIC);
        Ok(j)
    }

    /// Open the journal a previous daemon left for a ring of `entries`
    /// slots, and work out what to replay given the `rsp_prod` the ring
    /// page shows now. Errors mean the journal cannot be trusted.
    pub fn recover(
        path: &Path,
        abi: Abi,
        entries: u32,
        ring_rsp_prod: u32,
    ) -> io::Result<(Journal, Recovered)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let len = HDR_SIZE + entries as usize * ENTRY_SIZE;
        let flen = file.metadata()?.len();
        if flen != len as u64 {
            return Err(bad(
                path,
                format!("journal is {flen} bytes, a ring of {entries} slots needs {len}"),
            ));
        }
        let map = Self::map_file(path, &file, len)?;
        let mut j = Journal {
            path: path.to_path_buf(),
            map,
            len,
            slot_size: abi.slot_size(),
            entries,
            free: Vec::new(),
            answered: Vec::new(),
            _file: file,
        };
        if &j.bytes()[..8] != JOURNAL_MAGIC {
            return Err(bad(path, "not a refblk journal (bad magic)"));
        }
        let ver = j.get32(H_VERSION);
        if ver != JOURNAL_VERSION {
            return Err(bad(
                path,
                format!("journal version {ver}, this refblk reads version {JOURNAL_VERSION}"),
            ));
        }
        if j.get32(H_SLOT) as usize != j.slot_size || j.get32(H_ENTRIES) != entries {
            return Err(bad(path, "journal made for another ring geometry"));
        }
        let req_cons = j.get32(H_REQ_CONS);
        let j_rsp = j.get32(H_RSP_PROD);
        // The guest-visible rsp_prod is the truth about what was published,
        // unless the guest scribbled on it: it must lie between what the
        // journal saw published and what was consumed.
        let rsp_prod = ring_rsp_prod;
        if rsp_prod.wrapping_sub(j_rsp) > req_cons.wrapping_sub(j_rsp)
            || req_cons.wrapping_sub(j_rsp) > entries
        {
            return Err(bad(
                path,
                format!(
                    "ring rsp_prod {rsp_prod} outside the journal's window [{j_rsp}, {req_cons}]"
                ),
            ));
        }
        let mut replay = Vec::new();
        for i in 0..entries {
            let o = Self::entry_off(i);
            let live = j.get32(o + E_LIVE) == 1;
            let ring_idx = j.get32(o + E_RING_IDX);
            let age = req_cons.wrapping_sub(ring_idx);
            let answered = j.get32(o + E_ANSWERED) == 1;
            let rsp_pos = j.get32(o + E_RSP_POS);
            // Live, consumed before req_cons, within a ring of it, and not
            // answered by a response the guest can see.
            let published = answered && (1..=2 * entries).contains(&rsp_prod.wrapping_sub(rsp_pos));
            let wanted = live && (1..=entries).contains(&age) && !published;
            if wanted {
                let b = o + E_BYTES;
                replay.push(Replay {
                    entry: i,
                    ring_idx,
                    bytes: j.bytes()[b..b + j.slot_size].to_vec(),
                });
                // Answered again after the replay: clear the old answer.
                j.put32(o + E_ANSWERED, 0);
            } else {
                j.put32(o + E_LIVE, 0);
                j.free.push(i);
            }
        }
        let want = req_cons.wrapping_sub(rsp_prod);
        if replay.len() as u32 != want {
            return Err(bad(
                path,
                format!(
                    "journal holds {} unanswered request(s), the ring says {want} (req_cons {req_cons}, rsp_prod {rsp_prod})",
                    replay.len()
                ),
            ));
        }
        replay.sort_by_key(|r| std::cmp::Reverse(req_cons.wrapping_sub(r.ring_idx)));
        j.free.reverse();
        j.put32(H_RSP_PROD, rsp_prod);
        Ok((
            j,
            Recovered {
                req_cons,
                rsp_prod,
                replay,
            },
        ))
    }

    /// Record a request just consumed at ring index `ring_idx`; returns its
    /// entry. `None` only if every entry is live (the caller keeps consumed
    /// but unpublished requests within a ring, so this is a bug).
    pub fn consumed(&mut self, ring_idx: u32, slot: &[u8]) -> Option<u32> {
        let e = self.free.pop()?;
        let o = Self::entry_off(e);
        let n = slot.len().min(MAX_SLOT).min(self.slot_size);
        self.bytes_mut()[o + E_BYTES..o + E_BYTES + n].copy_from_slice(&slot[..n]);
        self.put32(o + E_RING_IDX, ring_idx);
        self.put32(o + E_ANSWERED, 0);
        // A crash from here on must find the entry complete before it is live,
        // and live before req_cons counts it.
        compiler_fence(Ordering::SeqCst);
        self.put32(o + E_LIVE, 1);
        compiler_fence(Ordering::SeqCst);
        self.put32(H_REQ_CONS, ring_idx.wrapping_add(1));
        Some(e)
    }

    /// The response for entry `e` was written at response position `rsp_pos`
    /// (not yet published).
    pub fn answered(&mut self, e: u32, rsp_pos: u32) {
        let o = Self::entry_off(e);
        self.put32(o + E_RSP_POS, rsp_pos);
        compiler_fence(Ordering::SeqCst);
        self.put32(o + E_ANSWERED, 1);
        self.answered.push(e);
    }

    /// `rsp_prod` was just published: free every entry answered before.
    pub fn published(&mut self, rsp_prod: u32) {
        compiler_fence(Ordering::SeqCst);
        self.put32(H_RSP_PROD, rsp_prod);
        compiler_fence(Ordering::SeqCst);
        for k in 0..self.answered.len() {
            let e = self.answered[k];
            self.put32(Self::entry_off(e) + E_LIVE, 0);
        }
        self.free.extend_from_slice(&self.answered);
        self.answered.clear();
    }

    /// Entries in use (consumed, response not published).
    pub fn live(&self) -> u32 {
        self.entries - self.free.len() as u32
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once; no reference into it outlives self.
        let _ = unsafe { nix::sys::mman::munmap(self.map.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(tag: u8) -> Vec<u8> {
        vec![tag; Abi::X86_64.slot_size()]
    }

    /// Consume 6 (indices wrap), answer 3 out of order, publish 2 of them,
    /// push a third answer without publishing it; recover with the ring's
    /// `rsp_prod` at `ring_rsp_delta` past the start.
    fn crash_scenario(ring_rsp_delta: u32) -> (Journal, Recovered) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("q0.journal");
        let base = u32::MAX - 3;
        let mut j = Journal::create(&p, Abi::X86_64, 32, base).unwrap();
        let mut e = Vec::new();
        for k in 0..6u32 {
            e.push(j.consumed(base.wrapping_add(k), &slot(k as u8)).unwrap());
        }
        j.answered(e[4], base);
        j.answered(e[1], base.wrapping_add(1));
        j.published(base.wrapping_add(2));
        j.answered(e[0], base.wrapping_add(2)); // pushed, not (yet) published
        drop(j);
        let r = Journal::recover(&p, Abi::X86_64, 32, base.wrapping_add(ring_rsp_delta)).unwrap();
        assert_eq!(r.1.req_cons, base.wrapping_add(6));
        r
    }

    #[test]
    fn journal_replays_exactly_the_unpublished_requests() {
        let (j, r) = crash_scenario(2);
        let tags: Vec<u8> = r.replay.iter().map(|x| x.bytes[0]).collect();
        assert_eq!(tags, vec![0, 2, 3, 5]);
        assert_eq!(j.live(), 4);
        // The daemon died between publishing rsp_prod in the ring page and
        // recording it in the journal: the ring page wins.
        let (j, r) = crash_scenario(3);
        let tags: Vec<u8> = r.replay.iter().map(|x| x.bytes[0]).collect();
        assert_eq!(tags, vec![2, 3, 5]);
        assert_eq!(j.live(), 3);
    }

    #[test]
    fn journal_refuses_bogus_rsp_prod_and_versions() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("q0.journal");
        let mut j = Journal::create(&p, Abi::X86_32, 64, 10).unwrap();
        j.consumed(10, &vec![1; Abi::X86_32.slot_size()]).unwrap();
        drop(j);
        assert!(Journal::recover(&p, Abi::X86_32, 64, 12).is_err());
        assert!(Journal::recover(&p, Abi::X86_32, 64, 9).is_err());
        assert!(Journal::recover(&p, Abi::X86_32, 32, 10).is_err());
        assert!(Journal::recover(&p, Abi::X86_64, 64, 10).is_err());
        let (_, r) = Journal::recover(&p, Abi::X86_32, 64, 10).unwrap();
        assert_eq!(r.replay.len(), 1);
        let mut b = std::fs::read(&p).unwrap();
        b[H_VERSION] = 9;
        std::fs::write(&p, &b).unwrap();
        let e = Journal::recover(&p, Abi::X86_32, 64, 10).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
    }

    #[test]
    fn device_state_round_trips_and_checks_its_version() {
        let st = DeviceState {
            domid: 5,
            devid: 51712,
            backend: "/local/domain/0/backend/vbd/5/51712".into(),
            frontend: "/local/domain/5/device/vbd/51712".into(),
            image: "/var/lib/x.img".into(),
            read_only: false,
            sector_size: 512,
            volume: Some(VolumeRef {
                pool: "/pool".into(),
                vid: "appvms/a/private".into(),
            }),
            abi: Abi::X86_32,
            persistent: true,
            sectors: 2048,
            features: Features {
                flush: true,
                barrier: true,
                discard: true,
                discard_secure: false,
            },
            max_indirect_segments: 256,
            queues: vec![QueueState {
                ring_refs: vec![8, 9],
                port: 3,
            }],
            limits: Some(
                crate::limits::Limits::parse_list("read-iops=500,write-bps=10M,burst=250ms")
                    .unwrap(),
            ),
        };
        let p = Path::new("x.json");
        assert_eq!(DeviceState::from_json(p, &st.to_json()).unwrap(), st);
        // A file of an older refblk has no limits: unlimited.
        let mut old = st.to_json();
        old.as_object_mut().unwrap().remove("limits");
        assert_eq!(DeviceState::from_json(p, &old).unwrap().limits, None);
        let mut v = st.to_json();
        v["version"] = serde_json::json!(2);
        assert!(DeviceState::from_json(p, &v).is_err());
    }

    /// A file written by the hand-written codec this replaced (a daemon
    /// before the upgrade) still reads, and the format written is the same
    /// but for the two features it now names.
    #[test]
    fn state_file_format_is_unchanged() {
        let text = r#"{"kind":"refblk-vbd-state","version":1,"domid":5,"devid":51712,
            "backend":"/local/domain/0/backend/vbd/5/51712",
            "frontend":"/local/domain/5/device/vbd/51712","image":"/srv/a.img",
            "read_only":false,"sector_size":512,
            "volume":{"pool":"/var/lib/qubes","vid":"appvms/work/private"},
            "protocol":"x86_32-abi","persistent":true,"sectors":2048,"discard":true,
            "discard_secure":false,"max_indirect_segments":256,
            "limits":"read-iops=500 burst=100ms",
            "queues":[{"ring_refs":[8,9],"port":3}]}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        let st = DeviceState::from_json(Path::new("old.json"), &v).unwrap();
        assert_eq!(st.abi, Abi::X86_32);
        assert_eq!(st.volume.as_ref().unwrap().vid, "appvms/work/private");
        assert_eq!(st.limits.unwrap().read_iops, 500);
        // Written back the same, plus the features flush and barrier (an
        // older file lacks them: they read as on, as refblk always had them).
        assert!(st.features.flush && st.features.barrier);
        let mut want = v.clone();
        want["flush"] = serde_json::json!(true);
        want["barrier"] = serde_json::json!(true);
        assert_eq!(st.to_json(), want);
        // No queues, or a wrong type, is refused with the file's name.
        let mut bad = v.clone();
        bad["queues"] = serde_json::json!([]);
        assert!(DeviceState::from_json(Path::new("old.json"), &bad).is_err());
        bad["queues"] = serde_json::json!("x");
        let e = DeviceState::from_json(Path::new("old.json"), &bad).unwrap_err();
        assert!(e.to_string().contains("old.json"), "{e}");
    }
}
