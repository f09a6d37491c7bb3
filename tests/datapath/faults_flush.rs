//! Flush semantics, checked on a recording of what the backend did: a FLUSH
//! or WRITE_BARRIER is answered OKAY only after its fdatasync completed, and
//! that fdatasync was issued only after every write consumed before the
//! flush (and a barrier's own write) had completed. The recording comes from
//! the backend's `IoObserver` hook (every queue step, in order, per queue).
//!
//! What this proves and what it does not: it checks the *order* of
//! operations handed to the kernel (write completions, then fdatasync, then
//! the response). That fdatasync makes completed writes durable is the file
//! system's promise; no power-cut device exists here to test it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::kit::*;
use refblk_core::backend::request::{IoEvent, IoObserver, Observer};
use refblk_core::backend::{AttachOptions, BackendConfig};
use refblk_sim::frontend::{FrontendOptions, IoRequest};

const OP_WRITE: u8 = 1;
const OP_BARRIER: u8 = 2;
const OP_FLUSH: u8 = 3;
const OP_INDIRECT: u8 = 6;

#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<(String, IoEvent)>>,
}

impl IoObserver for Recorder {
    fn event(&self, queue: &str, ev: IoEvent) {
        self.log.lock().unwrap().push((queue.to_string(), ev));
    }
}

/// Check the flush rule on one queue's events; returns the number of flush
/// responses checked, or the first violation.
fn check_queue(events: &[IoEvent]) -> Result<usize, String> {
    // Writes consumed and not yet completed (or answered with an error).
    let mut open_writes: Vec<u64> = Vec::new();
    let mut done_writes: HashSet<u64> = HashSet::new();
    // flush id -> writes it covers (consumed before it, plus its own data)
    let mut covers: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut fsync_done: HashSet<u64> = HashSet::new();
    let mut flush_ops: HashMap<u64, u8> = HashMap::new();
    let mut checked = 0;
    for (n, ev) in events.iter().enumerate() {
        match *ev {
            IoEvent::Consumed { id, op } => {
                // An INDIRECT request's inner op is not known here; treat it
                // as a possible write (stricter).
                if op == OP_FLUSH || op == OP_BARRIER {
                    let mut c: Vec<u64> = open_writes
                        .iter()
                        .copied()
                        .filter(|w| !done_writes.contains(w))
                        .collect();
                    if op == OP_BARRIER {
                        c.push(id);
                    }
                    covers.insert(id, c);
                    flush_ops.insert(id, op);
                }
                if op == OP_WRITE || op == OP_BARRIER || op == OP_INDIRECT {
                    open_writes.push(id);
                }
            }
            IoEvent::WriteDone { id } => {
                done_writes.insert(id);
            }
            IoEvent::FsyncIssued { id } => {
                let Some(c) = covers.get(&id) else {
                    return Err(format!("event {n}: fdatasync for {id}, not a flush"));
                };
                if let Some(w) = c.iter().find(|w| !done_writes.contains(w)) {
                    return Err(format!(
                        "event {n}: fdatasync of flush {id} issued before write {w} completed"
                    ));
                }
            }
            IoEvent::FsyncDone { id } => {
                fsync_done.insert(id);
            }
            IoEvent::Responded { id, op, status } => {
                if op == 0 {
                    // An INDIRECT read counted as a possible write above.
                    done_writes.insert(id);
                }
                if status != 0 {
                    // A failed write needs no durability; a failed flush
                    // tells the guest nothing is promised.
                    done_writes.insert(id);
                    continue;
                }
                if op == OP_FLUSH || op == OP_BARRIER {
                    if !fsync_done.contains(&id) {
                        return Err(format!(
                            "event {n}: flush {id} (op {op}) answered OKAY before its fdatasync completed"
                        ));
                    }
                    if flush_ops.get(&id) != Some(&op) {
                        return Err(format!("event {n}: response op {op} for {id}"));
                    }
                    checked += 1;
                }
                open_writes.retain(|w| *w != id);
            }
        }
    }
    Ok(checked)
}

fn check_all(log: &[(String, IoEvent)]) -> Result<usize, String> {
    let mut by_queue: HashMap<&str, Vec<IoEvent>> = HashMap::new();
    for (q, ev) in log {
        by_queue.entry(q).or_default().push(*ev);
    }
    let mut total = 0;
    for (q, evs) in by_queue {
        total += check_queue(&evs).map_err(|e| format!("{q}: {e}"))?;
    }
    Ok(total)
}

#[test]
fn the_checker_catches_a_flush_issued_too_early() {
    use IoEvent::*;
    let good = [
        Consumed {
            id: 1,
            op: OP_WRITE,
        },
        Consumed {
            id: 2,
            op: OP_FLUSH,
        },
        WriteDone { id: 1 },
        Responded {
            id: 1,
            op: OP_WRITE,
            status: 0,
        },
        FsyncIssued { id: 2 },
        FsyncDone { id: 2 },
        Responded {
            id: 2,
            op: OP_FLUSH,
            status: 0,
        },
    ];
    assert_eq!(check_queue(&good), Ok(1));
    let early = [
        Consumed {
            id: 1,
            op: OP_WRITE,
        },
        Consumed {
            id: 2,
            op: OP_FLUSH,
        },
        FsyncIssued { id: 2 },
        WriteDone { id: 1 },
    ];
    assert!(check_queue(&early).is_err());
    let answered_early = [
        Consumed {
            id: 3,
            op: OP_BARRIER,
        },
        WriteDone { id: 3 },
        FsyncIssued { id: 3 },
        Responded {
            id: 3,
            op: OP_BARRIER,
            status: 0,
        },
    ];
    assert!(check_queue(&answered_early).is_err());
}

#[test]
fn flushes_and_barriers_are_answered_after_the_writes_they_cover_are_synced() {
    let rec = Arc::new(Recorder::default());
    let Some(rig) = Rig::with_config(BackendConfig {
        observer: Some(Observer(rec.clone())),
        ..BackendConfig::default()
    }) else {
        return;
    };
    let g = rig.guest(3, 4096);
    let image = make_image(rig.dir.path(), "flush.img", 16 << 20);
    rig.attach(3, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(
        &g,
        XVDA,
        FrontendOptions {
            queues: 2,
            ring_page_order: 1,
            ..FrontendOptions::default()
        },
    );
    // Random I/O with flushes mixed in while writes are in flight.
    random_io(&mut fe, 11, 1500, 48, 64, 16 << 20, true);
    // Bursts: many writes, then a flush and a barrier without waiting.
    let mut rng = Rng::new(5);
    for round in 0..40 {
        let mut tags = Vec::new();
        for k in 0..24u64 {
            let mut d = vec![0u8; 4096 * (1 + (k as usize % 3))];
            rng.fill(&mut d);
            let sector = (round * 24 + k) * 32;
            tags.push(
                fe.submit(None, IoRequest::Write { sector, data: &d })
                    .unwrap(),
            );
        }
        tags.push(fe.submit(None, IoRequest::Flush).unwrap());
        let d = vec![round as u8; 4096];
        tags.push(
            fe.submit(
                None,
                IoRequest::Barrier {
                    sector: 30_000 + round * 8,
                    data: &d,
                },
            )
            .unwrap(),
        );
        for t in tags {
            let c = fe.wait_for(t, LONG).unwrap();
            assert_eq!(c.status, 0);
        }
    }
    let log = rec.log.lock().unwrap().clone();
    let checked = check_all(&log).unwrap_or_else(|e| panic!("flush rule broken: {e}"));
    eprintln!(
        "faults_flush: {checked} flush/barrier responses checked over {} events",
        log.len()
    );
    assert!(checked >= 80, "only {checked} flushes seen");
    assert!(fe.anomalies().is_clean());
    drop(fe);
    rig.shutdown();
}
