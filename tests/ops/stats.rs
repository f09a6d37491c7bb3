//! Live statistics (issue 8): the per-op counters, sectors, errors, gauges
//! and latency histograms match exactly what the guest did (two queues,
//! merged); `status` over the control socket carries them (old fields kept);
//! `refblk status` prints the table, `--json`, `--watch`; `refblk limit` and
//! `refblk volume limit` work and refuse bad values with exit code 2; a pool
//! volume's stored limits apply on attach-volume.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::kit::*;
use refblk_core::backend::control::{handle_line, ControlServer};
use refblk_core::backend::stats::{OpClass, StatsSnapshot};
use refblk_core::backend::AttachOptions;
use refblk_sim::frontend::{FrontendOptions, IoRequest, Tag, VbdSpec};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(20);

fn refblk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run refblk")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn counters_and_histograms_match_what_the_guest_did() {
    let Some(rig) = Rig::new() else { return };
    let image = make_image(rig.dir.path(), "s.img", 16 * MIB);
    let guest = rig.guest(9, 16384);
    let _vbd = rig.attach(9, XVDA, &image, "w", AttachOptions::default());
    let opts = FrontendOptions {
        queues: 2,
        ..FrontendOptions::default()
    };
    let mut fe = rig.connect(&guest, XVDA, opts);
    assert_eq!(fe.num_queues(), 2);
    let before = rig.status(9, XVDA).stats;
    assert!(before.collected);

    let data = vec![0xabu8; 8192];
    let mut tags: Vec<Tag> = Vec::new();
    let mut go = |fe: &mut refblk_sim::frontend::Frontend, i: usize, r: IoRequest<'_>| {
        tags.push(fe.submit(Some(i % 2), r).expect("submit"));
    };
    for i in 0..30 {
        go(
            &mut fe,
            i,
            IoRequest::Write {
                sector: i as u64 * 16,
                data: &data,
            },
        );
    }
    for i in 0..40 {
        go(
            &mut fe,
            i,
            IoRequest::Read {
                sector: i as u64 * 8,
                len: 4096,
            },
        );
    }
    for i in 0..5 {
        go(&mut fe, i, IoRequest::Flush);
    }
    for i in 0..3 {
        go(
            &mut fe,
            i,
            IoRequest::Discard {
                sector: 8192 + i as u64 * 64,
                nr_sectors: 64,
                secure: false,
            },
        );
    }
    let mut ring_requests = 0;
    let mut failed = 0;
    for t in tags.drain(..) {
        let c = fe.wait_for(t, T).expect("answer");
        ring_requests += c.ring_requests;
        assert_eq!(c.status, 0, "request failed");
    }
    assert_eq!(ring_requests, 78, "each operation is one ring request");
    // One read past the end of the disk: refused, counted as a read error.
    let bad = fe
        .submit(
            Some(0),
            IoRequest::Read {
                sector: 16 * MIB / 512,
                len: 4096,
            },
        )
        .unwrap();
    if fe.wait_for(bad, T).unwrap().status != 0 {
        failed += 1;
    }
    assert_eq!(failed, 1);

    let st = rig.status(9, XVDA);
    let d = st.stats.delta(&before);
    let op = |c| *d.op(c);
    assert_eq!(d.requests, 79);
    assert_eq!(d.rejected, 1);
    assert_eq!(
        (op(OpClass::Read).requests, op(OpClass::Read).sectors),
        (41, 320)
    );
    assert_eq!(op(OpClass::Read).errors, 1);
    assert_eq!(
        (op(OpClass::Write).requests, op(OpClass::Write).sectors),
        (30, 480)
    );
    assert_eq!(op(OpClass::Write).errors, 0);
    assert_eq!(
        (op(OpClass::Flush).requests, op(OpClass::Flush).sectors),
        (5, 0)
    );
    assert_eq!(
        (op(OpClass::Discard).requests, op(OpClass::Discard).sectors),
        (3, 192)
    );
    for c in OpClass::ALL {
        let o = op(c);
        assert_eq!(o.hist.iter().sum::<u64>(), o.requests, "{c:?} histogram");
    }
    assert!(op(OpClass::Write).latency_us > 0);
    assert!(op(OpClass::Write).percentile_us(0.99).is_some());
    assert_eq!((st.stats.in_flight, st.stats.queue_depth), (0, 0), "gauges");
    // The old counters agree.
    assert_eq!(st.reads, 40);
    assert_eq!(st.writes, 30);
    assert_eq!(st.flushes, 5);
    assert_eq!(st.discards, 3);

    // Over the control socket: the full statistics, old fields kept.
    let v = handle_line("status", &rig.backend);
    let dev = &v["devices"][0];
    for k in [
        "domid", "devid", "backend", "image", "state", "reads", "writes", "errors",
    ] {
        assert!(!dev[k].is_null(), "status lost {k}: {dev}");
    }
    assert_eq!(dev["vdev"], "xvda");
    let js = StatsSnapshot::from_json(&dev["stats"]);
    assert_eq!(js, st.stats);
    assert_eq!(dev["stats"]["ops"]["discard"]["sectors"], 192);
    fe.disconnect().unwrap();
    rig.shutdown();
}

#[test]
fn status_and_limit_commands() {
    let Some(rig) = Rig::new() else { return };
    let image = make_image(rig.dir.path(), "c.img", 16 * MIB);
    let guest = rig.guest(9, 16384);
    rig.ts
        .xs()
        .write(0, "/local/domain/9/name", b"statsvm")
        .unwrap();
    let _vbd = rig.attach(9, XVDA, &image, "w", AttachOptions::default());
    let mut fe = rig.connect(&guest, XVDA, FrontendOptions::default());
    fe.write(0, &vec![1u8; 64 << 10]).unwrap();
    let sock = rig.dir.path().join("ctl.sock");
    let _ctl = ControlServer::spawn(&sock, rig.backend.clone()).expect("control socket");
    let s = sock.to_str().unwrap();

    // The table.
    let o = refblk(&["status", "--control", s, "--interval", "0.2", "--wide"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let header = out.lines().find(|l| l.starts_with("DOMAIN")).expect(&out);
    for col in [
        "VDEV", "STATE", "IOPS", "MiB/s", "P50", "P99", "QD", "LIMIT", "IMAGE",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let row = out.lines().find(|l| l.starts_with("statsvm")).expect(&out);
    assert!(row.contains("xvda") && row.contains("Connected"), "{row}");
    assert!(row.contains(image.to_str().unwrap()), "{row}");

    // --json: the daemon's answer.
    let o = refblk(&["status", "--control", s, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["devices"][0]["stats"]["ops"]["write"]["requests"], 1);
    assert_eq!(v["devices"][0]["domain_name"], "statsvm");

    // --watch redraws (here: two screens).
    let o = refblk(&[
        "status",
        "--control",
        s,
        "--watch",
        "--count",
        "2",
        "--interval",
        "0.1",
    ]);
    let (out, _) = text(&o);
    assert_eq!(out.matches("DOMAIN").count(), 2, "{out}");

    // limit: by name, shows up in status; bad values exit 2 naming the flag.
    let o = refblk(&[
        "limit",
        "--control",
        s,
        "statsvm",
        "--read-iops",
        "250",
        "--write-bps",
        "8M",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        out.trim(),
        "domain 9 (statsvm): read-iops=250 write-bps=8M burst=100ms"
    );
    assert_eq!(rig.status(9, XVDA).domain_limits.read_iops, 250);
    let o = refblk(&["limit", "--control", s, "9/xvda", "--iops", "300"]);
    assert!(o.status.success());
    let o = refblk(&["status", "--control", s, "--interval", "0.1", "--wide"]);
    let (out, _) = text(&o);
    assert!(out.contains("r300/s,w300/s+r250/s,w8MiB/s"), "{out}");
    let o = refblk(&["limit", "--control", s, "statsvm", "--read-iops", "many"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--read-iops: \"many\" is not a whole number"),
        "{err}"
    );
    let o = refblk(&["limit", "--control", s, "statsvm", "--burst", "forever"]);
    assert_eq!(o.status.code(), Some(2));
    let o = refblk(&["limit", "--control", s, "9/xvdc", "--iops", "5"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("serves no device"), "{err}");
    let o = refblk(&["limit", "--control", s, "9/xvda", "--clear"]);
    assert!(o.status.success());
    assert!(rig.status(9, XVDA).limits.is_unlimited());
    let o = refblk(&[
        "ctl",
        "--control",
        s,
        "attach",
        "/x",
        "/y",
        "--limit",
        "iops=x",
    ]);
    assert_eq!(o.status.code(), Some(2));
    for cmd in [["status", "--help"], ["limit", "--help"]] {
        assert!(refblk(&cmd).status.success());
    }
    fe.disconnect().unwrap();
    rig.shutdown();
}

#[test]
fn a_volumes_stored_limits_apply_on_attach_volume() {
    let Some(rig) = Rig::new() else { return };
    let vid = "appvms/work/private";
    let pool_dir = pool_with_volume(rig.dir.path(), vid, 1, 8 * MIB);
    let p = pool_dir.to_str().unwrap();
    let o = refblk(&[
        "volume",
        "limit",
        "-p",
        p,
        vid,
        "--write-iops",
        "120",
        "--burst",
        "1s",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.trim(), format!("{vid}: write-iops=120 burst=1000ms"));
    assert!(Path::new(&format!("{p}/.refblk/volumes/{vid}.limits")).exists());
    let o = refblk(&["volume", "limit", "-p", p, vid, "--write-bps", "3X"]);
    assert_eq!(o.status.code(), Some(2));
    let o = refblk(&[
        "volume",
        "limit",
        "-p",
        p,
        "appvms/nope/private",
        "--iops",
        "1",
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("does not exist"), "{err}");

    let _g = rig.guest(21, 4096);
    let spec = VbdSpec::new(21, XVDA, "unused");
    let vbd = rig.ts.create_vbd_nodes(&spec).unwrap();
    assert!(wait_until(LONG, || rig.ts.backend_state(&vbd).unwrap()
        == xen_sys::xenbus::XenbusState::InitWait));
    // The disk line's keys override the stored ones.
    let v = handle_line(
        &format!("attach-volume {} {p} {vid} read-iops=40", vbd.backend_path),
        &rig.backend,
    );
    assert_eq!(v["ok"], true, "{v}");
    let l = rig.status(21, XVDA).limits;
    assert_eq!((l.read_iops, l.write_iops, l.burst_ms), (40, 120, 1000));
    rig.backend.detach(&vbd.backend_path).unwrap();
    rig.shutdown();
}
