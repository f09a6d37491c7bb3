//! Pools that Qubes manages (issue 19, What 3): a pool directory laid out as
//! Qubes lays out /var/lib/qubes, with a qubes.xml written here (our own
//! fixture, in the structure qubesd writes), is served with Qubes' settings:
//! a revisions_to_keep=3 origin keeps 3 revisions, a snap_on_start root and a
//! volatile volume are started and stopped (and recovered after a crash) as
//! Qubes' file-reflink driver does, only real volumes are listed, and refblk
//! leaves nothing behind that Qubes would not (no sidecar, no root.img,
//! precache or revision of a snapshot); `pool check` writes nothing. Also:
//! a xenstore backend whose params names a volume's image (What 2).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::common::*;
use crate::kit::{machine_dir, wait_until, HANG};
use refblk_core::xenstore::XsClient;
use refblk_sim::scratchfs::FsKind;

const PRIVATE: &str = "appvms/work/private";
const ROOT: &str = "appvms/work/root";
const VOLATILE: &str = "appvms/work/volatile";
const TPL: &str = "vm-templates/tpl/root";
const SIZE: u64 = 1 << 20;

/// A Qubes host's pool directory on `root`: qubes.xml inside it (as
/// /var/lib/qubes/qubes.xml is), a template's root, a qube `work` with a
/// revisions_to_keep=3 private, a snap_on_start root from the template and a
/// volatile volume, Qubes' other files, and the linux-kernel pool's
/// vm-kernels/ directory. No `.refblk/`: refblk never ran here.
struct Host {
    pool: PathBuf,
    xml: PathBuf,
}

impl Host {
    fn new(root: &Path) -> Host {
        let pool = root.join("qubes");
        let xml = pool.join("qubes.xml");
        let put = |rel: &str, data: &[u8]| {
            let p = pool.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        };
        put(&format!("{TPL}.img"), &pattern(1, SIZE as usize));
        put(&format!("{PRIVATE}.img"), &pattern(2, SIZE as usize));
        put("appvms/work/firewall.xml", b"<firewall/>\n");
        put("appvms/work/icon.png", b"png");
        put("vm-kernels/6.1.75-1/vmlinuz", b"kernel");
        put("vm-kernels/6.1.75-1/modules.img", &pattern(3, 4096));
        let d = pool.display();
        put(
            "qubes.xml",
            format!(
                r#"<?xml version='1.0' encoding='UTF-8'?>
<qubes version="3">
  <labels>
    <label color="0xcc0000" id="label-1">red</label>
  </labels>
  <pools>
    <pool dir_path="{d}" driver="file-reflink" ephemeral_volatile="False" name="varlibqubes" revisions_to_keep="1"/>
    <pool dir_path="{d}/vm-kernels" driver="linux-kernel" name="linux-kernel"/>
  </pools>
  <properties>
    <property name="default_pool">varlibqubes</property>
  </properties>
  <domains>
    <domain class="AdminVM" id="domain-0">
      <properties><property name="label" ref="label-1"/></properties>
    </domain>
    <domain class="TemplateVM" id="domain-1">
      <properties>
        <property name="qid">1</property>
        <property name="name">tpl</property>
        <property name="label" ref="label-1"/>
      </properties>
      <volume-config>
        <volume name="root" pool="varlibqubes" vid="{TPL}" revisions_to_keep="1" rw="True" save_on_stop="True" snap_on_start="False" size="{SIZE}"/>
        <volume name="private" pool="varlibqubes" vid="vm-templates/tpl/private" revisions_to_keep="0" rw="True" save_on_stop="True" snap_on_start="False" size="{SIZE}"/>
        <volume name="kernel" pool="linux-kernel" vid="6.1.75-1" revisions_to_keep="0" rw="False" save_on_stop="False" snap_on_start="False"/>
      </volume-config>
    </domain>
    <domain class="AppVM" id="domain-2">
      <properties>
        <property name="qid">2</property>
        <property name="name">work</property>
        <property name="label" ref="label-1"/>
        <property name="template" ref="domain-1">tpl</property>
      </properties>
      <volume-config>
        <volume name="root" pool="varlibqubes" vid="{ROOT}" revisions_to_keep="0" rw="True" save_on_stop="False" snap_on_start="True" source="{TPL}" size="{SIZE}"/>
        <volume name="private" pool="varlibqubes" vid="{PRIVATE}" revisions_to_keep="3" rw="True" save_on_stop="True" snap_on_start="False" size="{SIZE}"/>
        <volume name="volatile" pool="varlibqubes" vid="{VOLATILE}" revisions_to_keep="0" rw="True" save_on_stop="False" snap_on_start="False" size="{SIZE}"/>
        <volume name="kernel" pool="linux-kernel" vid="6.1.75-1" revisions_to_keep="0" rw="False" save_on_stop="False" snap_on_start="False"/>
      </volume-config>
    </domain>
  </domains>
</qubes>
"#
            )
            .as_bytes(),
        );
        // the template's private is stopped and has its image too
        put("vm-templates/tpl/private.img", &pattern(4, SIZE as usize));
        Host { pool, xml }
    }

    fn d(&self) -> &str {
        self.pool.to_str().unwrap()
    }

    /// `refblk ARGS -p POOL --qubes-xml XML`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--qubes-xml", self.xml.to_str().unwrap()]);
        if a[0] == "volume" {
            a.extend(["-p", self.d()]);
        }
        run_env(&a, &[])
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.pool.join(rel)
    }

    /// The revision files of `vid`, sorted by number.
    fn revisions(&self, vid: &str) -> Vec<(u64, PathBuf)> {
        let p = self.path(vid);
        let dir = p.parent().unwrap();
        let stem = format!("{}.img.", p.file_name().unwrap().to_str().unwrap());
        let mut v: Vec<(u64, PathBuf)> = ls(dir)
            .into_iter()
            .filter_map(|n| {
                let rest = n.strip_prefix(&stem)?;
                let (num, _) = rest.split_once('@')?;
                Some((num.parse().ok()?, dir.join(&n)))
            })
            .collect();
        v.sort();
        v
    }

    /// refblk's files in the pool other than lock files (sidecars, start
    /// records): none may be left for volumes refblk did not create.
    fn refblk_files(&self) -> Vec<String> {
        tree(&self.path(".refblk"))
            .into_iter()
            .filter(|p| !p.ends_with('/') && !p.ends_with(".lock"))
            .collect()
    }
}

fn start(h: &Host, vid: &str) -> PathBuf {
    PathBuf::from(h.ok(&["volume", "start", vid]).trim())
}

/// Remove the start record refblk wrote: what a crash and a reboot leave (a
/// record of another boot counts as none).
fn crash(h: &Host, vid: &str) {
    std::fs::remove_file(h.path(&format!(".refblk/volumes/{vid}.running"))).unwrap();
}

fn qubes_origin_keeps_qubes_revisions(kind: FsKind) {
    let Some(fs) = scratch(kind) else { return };
    let h = Host::new(fs.path());
    // refblk's own default would keep 1 (no .refblk/pool.json here)
    let mut data = vec![pattern(2, SIZE as usize)];
    for round in 0..5u64 {
        let dirty = start(&h, PRIVATE);
        assert_eq!(dirty, h.path(&format!("{PRIVATE}-dirty.img")));
        assert_eq!(read(&dirty), data[round as usize], "round {round}");
        let next = pattern(100 + round, SIZE as usize);
        write_at(&dirty, 0, &next);
        data.push(next);
        assert!(h.ok(&["volume", "stop", PRIVATE]).contains("committed"));
    }
    let revs = h.revisions(PRIVATE);
    let nums: Vec<u64> = revs.iter().map(|r| r.0).collect();
    assert_eq!(nums, [3, 4, 5], "qubes.xml keeps 3 revisions: {revs:?}");
    for (i, (_, p)) in revs.iter().enumerate() {
        // revision N holds the data committed before the N-th stop
        assert_eq!(read(p), data[2 + i], "revision {}", revs[i].0);
    }
    assert_eq!(read(&h.path(&format!("{PRIVATE}.img"))), data[5]);
    assert!(
        h.refblk_files().is_empty(),
        "refblk wrote settings into a Qubes pool: {:?}",
        h.refblk_files()
    );
    let info: serde_json::Value =
        serde_json::from_str(&h.ok(&["volume", "info", PRIVATE, "--json"])).unwrap();
    assert_eq!(info["settings"], "qubes.xml", "{info}");
    assert_eq!(info["revisions_to_keep"], 3, "{info}");
}

#[test]
fn qubes_origin_keeps_qubes_revisions_on_btrfs() {
    qubes_origin_keeps_qubes_revisions(FsKind::Btrfs);
}

#[test]
fn qubes_origin_keeps_qubes_revisions_on_xfs() {
    qubes_origin_keeps_qubes_revisions(FsKind::Xfs);
}

/// Only Qubes' own files of a stopped snapshot/volatile volume: none.
fn assert_no_files(h: &Host, vid: &str) {
    let p = h.path(vid);
    let name = p.file_name().unwrap().to_str().unwrap().to_string();
    let left: Vec<String> = ls(p.parent().unwrap())
        .into_iter()
        .filter(|n| n.starts_with(&format!("{name}.")) || n.starts_with(&format!("{name}-")))
        .collect();
    assert!(left.is_empty(), "{vid} left {left:?}");
}

fn qubes_snapshot_and_volatile_as_qubes_does(kind: FsKind) {
    let Some(fs) = scratch(kind) else { return };
    let h = Host::new(fs.path());
    let tpl = h.path(&format!("{TPL}.img"));
    let tpl_before = listing(&h.path("vm-templates"));
    let template_data = pattern(1, SIZE as usize);

    // snap_on_start root: own clean = the template's inode, dirty a copy of it
    let dirty = start(&h, ROOT);
    assert_eq!(ino(&h.path(&format!("{ROOT}.img"))), ino(&tpl));
    assert_eq!(read(&dirty), template_data);
    write_at(&dirty, 0, &pattern(50, 4096));
    let out = h.ok(&["volume", "stop", ROOT]);
    assert!(out.contains("discarded"), "{out}");
    assert_no_files(&h, ROOT);

    // crashed while running: discarded, never committed
    let dirty = start(&h, ROOT);
    write_at(&dirty, 0, &pattern(51, 4096));
    crash(&h, ROOT);
    let out = h.ok(&["volume", "stop", ROOT]);
    assert!(out.contains("discarded"), "{out}");
    assert_no_files(&h, ROOT);
    // crashed, then started again: a fresh snapshot of the template
    let dirty = start(&h, ROOT);
    write_at(&dirty, 0, &pattern(52, 4096));
    crash(&h, ROOT);
    let dirty = start(&h, ROOT);
    assert_eq!(read(&dirty), template_data, "a crashed snapshot was reused");
    h.ok(&["volume", "stop", ROOT]);
    assert_no_files(&h, ROOT);

    // volatile: a fresh sparse image of qubes.xml's size, removed at stop,
    // also after a crash
    for crashed in [false, true] {
        let dirty = start(&h, VOLATILE);
        assert_eq!(std::fs::metadata(&dirty).unwrap().len(), SIZE);
        assert_eq!(read(&dirty), vec![0u8; SIZE as usize]);
        write_at(&dirty, 0, &pattern(60, 4096));
        if crashed {
            crash(&h, VOLATILE);
            let again = start(&h, VOLATILE);
            assert_eq!(read(&again), vec![0u8; SIZE as usize], "volatile kept data");
        }
        let out = h.ok(&["volume", "stop", VOLATILE]);
        assert!(out.contains("discarded"), "{out}");
        assert_no_files(&h, VOLATILE);
    }
    // the template is as it was: no revision, no precache, no extra link
    assert_eq!(listing(&h.path("vm-templates")), tpl_before);
    assert!(
        h.refblk_files().is_empty(),
        "refblk wrote settings into a Qubes pool: {:?}",
        h.refblk_files()
    );
    let o = h.run(&["pool", "check", h.d()]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn qubes_snapshot_and_volatile_as_qubes_does_on_btrfs() {
    qubes_snapshot_and_volatile_as_qubes_does(FsKind::Btrfs);
}

#[test]
fn qubes_snapshot_and_volatile_as_qubes_does_on_xfs() {
    qubes_snapshot_and_volatile_as_qubes_does(FsKind::Xfs);
}

fn qubes_pool_check_writes_nothing(kind: FsKind) {
    let Some(fs) = scratch(kind) else { return };
    let h = Host::new(fs.path());
    // leftovers Qubes' driver could leave (a crashed root, a temp file) and a
    // running private: all reported, nothing written
    start(&h, ROOT);
    crash(&h, ROOT);
    start(&h, PRIVATE);
    std::fs::write(h.path(&format!("{PRIVATE}.img~abc123xy")), b"tmp").unwrap();
    // the lock files refblk made for start are its own: remove them so that
    // none may appear
    for l in tree(&h.path(".refblk"))
        .into_iter()
        .filter(|p| p.ends_with(".lock"))
    {
        std::fs::remove_file(h.path(".refblk").join(l)).unwrap();
    }
    let before = listing(&h.pool);
    for json in [false, true] {
        let mut args = vec!["pool", "check", h.d()];
        if json {
            args.push("--json");
        }
        let o = h.run(&args);
        assert_eq!(o.status.code(), Some(9), "{}", text(&o));
        let t = text(&o);
        assert!(t.contains(ROOT) && t.contains("abc123xy"), "{t}");
        assert!(!t.contains("vm-kernels"), "{t}");
        assert_eq!(listing(&h.pool), before, "pool check wrote into the pool");
    }
    for args in [
        vec!["volume", "list"],
        vec!["volume", "list", "--json"],
        vec!["volume", "info", PRIVATE],
        vec!["volume", "info", ROOT, "--json"],
        vec!["volume", "revisions", PRIVATE],
    ] {
        h.ok(&args);
        assert_eq!(listing(&h.pool), before, "{args:?} wrote into the pool");
    }
    let o = h.run(&["pool", "info", h.d()]);
    assert!(text(&o).contains("managed by Qubes"), "{}", text(&o));
    assert_eq!(listing(&h.pool), before, "pool info wrote into the pool");
}

#[test]
fn qubes_pool_check_writes_nothing_on_btrfs() {
    qubes_pool_check_writes_nothing(FsKind::Btrfs);
}

#[test]
fn qubes_pool_check_writes_nothing_on_xfs() {
    qubes_pool_check_writes_nothing(FsKind::Xfs);
}

/// `volume list` shows the volumes qubes.xml names (also stopped snapshot and
/// volatile ones, which have no file), with Qubes' kinds, and not
/// vm-kernels/*/modules (the linux-kernel pool's file). Found through
/// $REFBLK_QUBES_XML.
#[test]
fn qubes_lists_only_real_volumes() {
    let Some(fs) = scratch(FsKind::Btrfs) else {
        return;
    };
    let h = Host::new(fs.path());
    let o = run_env(
        &["volume", "list", "--json", "-p", h.d()],
        &[("REFBLK_QUBES_XML", h.xml.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let got: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["vid"].as_str().unwrap().to_string(),
                i["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        (PRIVATE, "origin"),
        (ROOT, "snapshot"),
        (VOLATILE, "volatile"),
        ("vm-templates/tpl/private", "origin"),
        (TPL, "origin"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want, "{v:#}");
    // without qubes.xml the same directory is a plain pool (kernels included)
    let o = run_env(&["volume", "list", "-p", h.d(), "--qubes-xml", "none"], &[]);
    assert!(text(&o).contains("vm-kernels"), "{}", text(&o));
}

/// Qubes' settings win over a sidecar refblk kept (warning naming the volume
/// and both values), a flag contradicting them is refused, refblk makes no
/// sidecar for Qubes' volumes, and the sidecar of a volume Qubes removed
/// neither lists it nor blocks creating it again.
#[test]
fn qubes_settings_win_over_the_sidecar() {
    let Some(fs) = scratch(FsKind::Xfs) else {
        return;
    };
    let h = Host::new(fs.path());
    let side = h.path(&format!(".refblk/volumes/{PRIVATE}.json"));
    std::fs::create_dir_all(side.parent().unwrap()).unwrap();
    std::fs::write(
        &side,
        r#"{"format":1,"kind":"origin","source":null,"revisions_to_keep":1,"size":null,"rw":true}"#,
    )
    .unwrap();
    for round in 0..4 {
        let o = h.run(&["volume", "start", PRIVATE]);
        assert!(o.status.success(), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(PRIVATE)
                && err.contains("revisions_to_keep 3")
                && err.contains("sidecar: 1"),
            "round {round}: no warning naming both values: {err}"
        );
        h.ok(&["volume", "stop", PRIVATE]);
    }
    assert_eq!(h.revisions(PRIVATE).len(), 3, "{:?}", h.revisions(PRIVATE));
    let before = listing(&h.pool);
    for args in [
        vec!["volume", "start", PRIVATE, "--revisions-to-keep", "1"],
        vec!["volume", "stop", ROOT, "--kind", "origin"],
        vec!["volume", "config", PRIVATE, "--revisions-to-keep", "3"],
        vec!["volume", "config", VOLATILE, "--kind", "volatile"],
        vec![
            "volume", "create", VOLATILE, "--kind", "volatile", "--size", "1M",
        ],
        vec!["volume", "remove", PRIVATE],
        vec!["volume", "remove", VOLATILE],
        vec!["volume", "remove", TPL],
        vec!["volume", "resize", VOLATILE, "2M"],
        vec!["volume", "resize", ROOT, "2M"],
    ] {
        let o = h.run(&args);
        assert!(!o.status.success(), "{args:?}: {}", text(&o));
        assert!(o.stdout.is_empty(), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("qubes"), "{args:?}: {}", text(&o));
        assert_eq!(listing(&h.pool), before, "{args:?} changed the pool");
    }
    // check reports the unused sidecar; --repair removes it
    let o = h.run(&["pool", "check", h.d()]);
    assert_eq!(o.status.code(), Some(9), "{}", text(&o));
    h.ok(&["pool", "check", h.d(), "--repair"]);
    assert!(!side.exists());
    // a sidecar refblk kept for a volatile volume Qubes has since removed
    let gone = "appvms/gone/volatile";
    let gside = h.path(&format!(".refblk/volumes/{gone}.json"));
    std::fs::create_dir_all(gside.parent().unwrap()).unwrap();
    std::fs::write(
        &gside,
        r#"{"format":1,"kind":"volatile","source":null,"revisions_to_keep":0,"size":1048576,"rw":true}"#,
    )
    .unwrap();
    assert!(!h.ok(&["volume", "list"]).contains(gone));
    let o = h.run(&["pool", "check", h.d()]);
    assert!(text(&o).contains(gone), "{}", text(&o));
    h.ok(&[
        "volume", "create", gone, "--kind", "volatile", "--size", "1M",
    ]);
    assert!(h.ok(&["volume", "list"]).contains(gone));
    h.ok(&["volume", "remove", gone]);
    assert!(!gside.exists(), "the sidecar outlived its volume");
}

/// Bad qubes.xml: named but missing (3), unparsable (2), a bad value in one
/// volume (2 for that volume; the others still listed) — each message names
/// the file and the way out.
#[test]
fn bad_qubes_xml_is_refused_with_the_way_out() {
    let tmp = machine_dir();
    let h = Host::new(tmp.path());
    let d = h.d().to_string();
    let missing = tmp.path().join("nope.xml");
    let o = run_env(
        &[
            "volume",
            "list",
            "-p",
            &d,
            "--qubes-xml",
            missing.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("nope.xml") && text(&o).contains("--qubes-xml none"));
    let bad = tmp.path().join("bad.xml");
    std::fs::write(&bad, "<qubes><pools>").unwrap();
    let o = run_env(
        &[
            "volume",
            "start",
            PRIVATE,
            "-p",
            &d,
            "--qubes-xml",
            bad.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("bad.xml") && text(&o).contains("--qubes-xml none"));
    let xml = std::fs::read_to_string(&h.xml).unwrap().replace(
        r#"vid="appvms/work/private" revisions_to_keep="3""#,
        r#"vid="appvms/work/private" revisions_to_keep="three""#,
    );
    let odd = tmp.path().join("odd.xml");
    std::fs::write(&odd, xml).unwrap();
    let q = ["--qubes-xml", odd.to_str().unwrap()];
    let o = run_env(
        &[&["volume", "start", PRIVATE, "-p", &d][..], &q].concat(),
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("revisions_to_keep=\"three\"") && text(&o).contains("qube work"),
        "{}",
        text(&o)
    );
    let o = run_env(&[&["volume", "list", "-p", &d][..], &q].concat(), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(TPL),
        "{}",
        text(&o)
    );
    assert!(
        !exists(&h.path(".refblk")),
        "a refused command wrote .refblk/"
    );
}

/// A xenstore backend whose `params` names a volume's dirty image (a
/// toolstack attaching it, no process holding it yet) makes the volume
/// running-by-someone-else: stop refused (exit 5, naming the backend), info
/// shows it; once the backend is gone, stop works.
#[test]
fn a_xenstore_backend_naming_the_image_is_a_user() {
    let mdir = machine_dir();
    struct Sim(std::process::Child);
    impl Drop for Sim {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.0.wait();
        }
    }
    let simdir = mdir.path().join("xen");
    std::fs::create_dir(&simdir).unwrap();
    let _sim = Sim(Command::new(env!("CARGO_BIN_EXE_refblk"))
        .args(["sim", "--dir"])
        .arg(&simdir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let xs = simdir.join("xenstored.sock");
    assert!(
        wait_until(HANG, || XsClient::connect_unix(&xs).is_ok()),
        "simulator never came up"
    );
    let pool = mdir.path().join("pool");
    let d = pool.to_str().unwrap();
    let s = simdir.to_str().unwrap();
    let ok = |args: &[&str]| {
        let o = run_env(args, &[]);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    ok(&["pool", "init", "--no-setup-check", d]);
    ok(&["volume", "create", "-p", d, PRIVATE, "--size", "1M"]);
    let dirty = ok(&["volume", "start", "-p", d, PRIVATE]);
    let dirty = dirty.trim();
    let c = XsClient::connect_unix(&xs).unwrap();
    let be = "/local/domain/0/backend/vbd/7/51712";
    c.write(0, &format!("{be}/params"), dirty.as_bytes())
        .unwrap();
    let before = listing(&pool);
    let o = run_env(&["volume", "stop", "-p", d, PRIVATE, "--sim", s], &[]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains(be), "{}", text(&o));
    assert_eq!(listing(&pool), before, "a refused stop changed the pool");
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "volume", "info", "-p", d, PRIVATE, "--json", "--sim", s,
    ]))
    .unwrap();
    assert!(v["users"].to_string().contains(be), "{v}");
    // refblk's own pool targets name no image
    c.write(
        0,
        &format!("{be}/params"),
        format!("pool:{d}:{PRIVATE}").as_bytes(),
    )
    .unwrap();
    let o = run_env(
        &["volume", "info", "-p", d, PRIVATE, "--json", "--sim", s],
        &[],
    );
    assert!(!text(&o).contains(be), "{}", text(&o));
    c.rm(0, be).unwrap();
    assert!(ok(&["volume", "stop", "-p", d, PRIVATE, "--sim", s]).contains("committed"));
}
