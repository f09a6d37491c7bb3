//! Compare every blkif / ring / xenbus size, offset and constant of `xen-sys`
//! with Xen's public C headers (Debian `libxen-dev`).
//!
//! - Native (x86_64): a small C program is compiled with `cc` (or `$CC`) against
//!   `<xen/io/blkif.h>`, run, and prints `@@LAYOUT key value` lines.
//! - x86_32: the same source is compiled with `-m32 -ffreestanding -S` (no 32-bit
//!   libc needed: values are emitted into the assembly as `.ascii` strings) and
//!   compared with `xen_sys::blkif::x86_32`. When the compiler cannot target i386
//!   the test says so and relies on the compile-time asserts in `blkif.rs`.
//!
//! Missing headers or compiler make the test fail (install `libxen-dev`/`gcc`),
//! unless `REFBLK_ALLOW_SKIP=1`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use xen_sys::blkif::{self, blkif_request_segment};
use xen_sys::ring;
use xen_sys::xenbus::XenbusState;

/// (key, C expression, value in Rust)
type Item = (String, String, i64);

macro_rules! size {
    ($v:ident, $c:literal, $r:ty) => {
        $v.push((
            format!("sizeof({})", $c),
            format!("sizeof({})", $c),
            core::mem::size_of::<$r>() as i64,
        ))
    };
}
macro_rules! off {
    ($v:ident, $c:literal, $r:ty, $($f:ident),+) => {
        $( $v.push((
            format!("offsetof({}, {})", $c, stringify!($f)),
            format!("offsetof({}, {})", $c, stringify!($f)),
            core::mem::offset_of!($r, $f) as i64,
        )); )+
    };
}
macro_rules! konst {
    ($v:ident, $c:ident, $r:expr) => {
        $v.push((
            stringify!($c).to_string(),
            stringify!($c).to_string(),
            $r as i64,
        ))
    };
}

/// Items whose value is the same in both ABIs.
fn common_items() -> Vec<Item> {
    let mut v = Vec::new();
    size!(v, "struct blkif_request_segment", blkif_request_segment);
    off!(
        v,
        "struct blkif_request_segment",
        blkif_request_segment,
        gref,
        first_sect,
        last_sect
    );
    v.push((
        "offsetof(struct blkif_sring, ring)".into(),
        "offsetof(struct blkif_sring, ring)".into(),
        ring::RING_HEADER_SIZE as i64,
    ));
    off!(
        v,
        "struct blkif_sring",
        ring::sring_header,
        req_prod,
        req_event,
        rsp_prod,
        rsp_event,
        pvt
    );
    v.push((
        "offsetof(struct blkif_sring, __pad)".into(),
        "offsetof(struct blkif_sring, __pad)".into(),
        core::mem::offset_of!(ring::sring_header, pad) as i64,
    ));
    konst!(v, BLKIF_OP_READ, blkif::BLKIF_OP_READ);
    konst!(v, BLKIF_OP_WRITE, blkif::BLKIF_OP_WRITE);
    konst!(v, BLKIF_OP_WRITE_BARRIER, blkif::BLKIF_OP_WRITE_BARRIER);
    konst!(v, BLKIF_OP_FLUSH_DISKCACHE, blkif::BLKIF_OP_FLUSH_DISKCACHE);
    konst!(v, BLKIF_OP_RESERVED_1, blkif::BLKIF_OP_RESERVED_1);
    konst!(v, BLKIF_OP_DISCARD, blkif::BLKIF_OP_DISCARD);
    konst!(v, BLKIF_OP_INDIRECT, blkif::BLKIF_OP_INDIRECT);
    konst!(
        v,
        BLKIF_MAX_SEGMENTS_PER_REQUEST,
        blkif::BLKIF_MAX_SEGMENTS_PER_REQUEST
    );
    konst!(
        v,
        BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
        blkif::BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
    );
    konst!(v, BLKIF_DISCARD_SECURE, blkif::BLKIF_DISCARD_SECURE);
    konst!(v, BLKIF_RSP_EOPNOTSUPP, blkif::BLKIF_RSP_EOPNOTSUPP);
    konst!(v, BLKIF_RSP_ERROR, blkif::BLKIF_RSP_ERROR);
    konst!(v, BLKIF_RSP_OKAY, blkif::BLKIF_RSP_OKAY);
    konst!(v, VDISK_CDROM, blkif::VDISK_CDROM);
    konst!(v, VDISK_REMOVABLE, blkif::VDISK_REMOVABLE);
    konst!(v, VDISK_READONLY, blkif::VDISK_READONLY);
    v.push((
        "segments per indirect page".into(),
        "4096 / sizeof(struct blkif_request_segment)".into(),
        blkif::BLKIF_SEGMENTS_PER_INDIRECT_PAGE as i64,
    ));
    for (name, st) in [
        ("XenbusStateUnknown", XenbusState::Unknown),
        ("XenbusStateInitialising", XenbusState::Initialising),
        ("XenbusStateInitWait", XenbusState::InitWait),
        ("XenbusStateInitialised", XenbusState::Initialised),
        ("XenbusStateConnected", XenbusState::Connected),
        ("XenbusStateClosing", XenbusState::Closing),
        ("XenbusStateClosed", XenbusState::Closed),
        ("XenbusStateReconfiguring", XenbusState::Reconfiguring),
        ("XenbusStateReconfigured", XenbusState::Reconfigured),
    ] {
        v.push((name.into(), name.into(), st as i64));
    }
    v
}

/// Items of the native (x86_64) layout.
fn x86_64_items() -> Vec<Item> {
    use blkif::x86_64::*;
    let mut v = common_items();
    size!(v, "struct blkif_request", blkif_request);
    off!(
        v,
        "struct blkif_request",
        blkif_request,
        operation,
        nr_segments,
        handle,
        id,
        sector_number,
        seg
    );
    size!(v, "struct blkif_request_discard", blkif_request_discard);
    off!(
        v,
        "struct blkif_request_discard",
        blkif_request_discard,
        operation,
        flag,
        handle,
        id,
        sector_number,
        nr_sectors
    );
    size!(v, "struct blkif_request_indirect", blkif_request_indirect);
    off!(
        v,
        "struct blkif_request_indirect",
        blkif_request_indirect,
        operation,
        indirect_op,
        nr_segments,
        id,
        sector_number,
        handle,
        indirect_grefs
    );
    size!(v, "struct blkif_response", blkif_response);
    off!(
        v,
        "struct blkif_response",
        blkif_response,
        id,
        operation,
        status
    );
    size!(v, "union blkif_sring_entry", blkif_sring_entry);
    for order in 0..=ring::MAX_RING_PAGE_ORDER {
        v.push((
            format!("ring entries order {order}"),
            format!("__CONST_RING_SIZE(blkif, 4096 << {order})"),
            ring::blkif_ring_size_x86_64(order) as i64,
        ));
    }
    v
}

/// Items of the i386 layout (the public header compiled with `-m32`).
fn x86_32_items() -> Vec<Item> {
    use blkif::x86_32::*;
    let mut v = common_items();
    size!(v, "struct blkif_request", blkif_request);
    off!(
        v,
        "struct blkif_request",
        blkif_request,
        operation,
        nr_segments,
        handle,
        id,
        sector_number,
        seg
    );
    size!(v, "struct blkif_request_discard", blkif_request_discard);
    off!(
        v,
        "struct blkif_request_discard",
        blkif_request_discard,
        operation,
        flag,
        handle,
        id,
        sector_number,
        nr_sectors
    );
    size!(v, "struct blkif_request_indirect", blkif_request_indirect);
    off!(
        v,
        "struct blkif_request_indirect",
        blkif_request_indirect,
        operation,
        indirect_op,
        nr_segments,
        id,
        sector_number,
        handle,
        indirect_grefs,
        pad
    );
    size!(v, "struct blkif_response", blkif_response);
    off!(
        v,
        "struct blkif_response",
        blkif_response,
        id,
        operation,
        status
    );
    size!(v, "union blkif_sring_entry", blkif_sring_entry);
    for order in 0..=ring::MAX_RING_PAGE_ORDER {
        v.push((
            format!("ring entries order {order}"),
            format!("__CONST_RING_SIZE(blkif, 4096 << {order})"),
            ring::blkif_ring_size_x86_32(order) as i64,
        ));
    }
    v
}

fn c_source(items: &[Item]) -> String {
    let mut s = String::from(
        "#include <stdint.h>\n#include <stddef.h>\n\
         #include <xen/xen.h>\n#include <xen/io/blkif.h>\n#include <xen/io/xenbus.h>\n\
         #ifdef LAYOUT_ASM\n\
         #define EMIT(k, v) __asm__ volatile(\"\\n.ascii \\\"@@LAYOUT \" k \"=%c0\\\"\" :: \"i\"((long)(v)))\n\
         #else\n#include <stdio.h>\n\
         #define EMIT(k, v) printf(\"@@LAYOUT %s=%ld\\n\", k, (long)(v))\n\
         #endif\n\
         int main(void) {\n",
    );
    for (key, expr, _) in items {
        writeln!(s, "    EMIT(\"{key}\", {expr});").unwrap();
    }
    s.push_str("    return 0;\n}\n");
    s
}

/// Parse `@@LAYOUT key=value` from program output or assembly.
fn parse(out: &str) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for line in out.lines() {
        if let Some(rest) = line.split("@@LAYOUT ").nth(1) {
            let rest = rest.trim_end_matches('"');
            let (k, v) = rest.rsplit_once('=').expect("malformed layout line");
            m.insert(k.to_string(), v.trim().parse().expect("layout value"));
        }
    }
    m
}

fn compare(abi: &str, items: &[Item], c: &BTreeMap<String, i64>) {
    let mut bad = Vec::new();
    for (key, _, rust) in items {
        match c.get(key) {
            Some(cv) if cv == rust => println!("{abi}: {key} = {rust} (C and Rust agree)"),
            Some(cv) => bad.push(format!("{abi}: {key}: C says {cv}, xen-sys says {rust}")),
            None => bad.push(format!("{abi}: {key}: missing from the C program's output")),
        }
    }
    assert!(bad.is_empty(), "layout mismatches:\n{}", bad.join("\n"));
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".to_string())
}

fn skip_or_fail(msg: &str) {
    if std::env::var("REFBLK_ALLOW_SKIP").as_deref() == Ok("1") {
        println!("SKIP: {msg}");
    } else {
        panic!("{msg} (set REFBLK_ALLOW_SKIP=1 to skip)");
    }
}

/// A scratch directory under the target dir, removed when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn workdir(name: &str) -> WorkDir {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("c_layout-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    WorkDir(d)
}

fn headers_missing(stderr: &str) -> bool {
    stderr.contains("xen/") && (stderr.contains("No such file") || stderr.contains("not found"))
}

#[test]
fn native_layout_matches_c_headers() {
    let items = x86_64_items();
    let dir = workdir("native");
    let src = dir.0.join("layout.c");
    let exe = dir.0.join("layout");
    std::fs::write(&src, c_source(&items)).unwrap();
    let out = match Command::new(cc()).arg("-o").arg(&exe).arg(&src).output() {
        Ok(o) => o,
        Err(e) => {
            return skip_or_fail(&format!(
                "cannot run C compiler `{}`: {e}; install gcc",
                cc()
            ))
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if headers_missing(&stderr) {
            return skip_or_fail(&format!(
                "Xen public headers not found (xen/io/blkif.h): install libxen-dev (apt-get install libxen-dev). Compiler said:\n{stderr}"
            ));
        }
        panic!("compiling {} failed:\n{stderr}", src.display());
    }
    let run = Command::new(&exe).output().expect("run layout program");
    assert!(run.status.success(), "layout program failed");
    let c = parse(&String::from_utf8_lossy(&run.stdout));
    compare("x86_64", &items, &c);
}

#[test]
fn x86_32_layout_matches_c_headers_compiled_for_i386() {
    let items = x86_32_items();
    let dir = workdir("x86_32");
    let src = dir.0.join("layout.c");
    std::fs::write(&src, c_source(&items)).unwrap();
    let out = match Command::new(cc())
        .args(["-m32", "-ffreestanding", "-DLAYOUT_ASM", "-S", "-o", "-"])
        .arg(&src)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            return skip_or_fail(&format!(
                "cannot run C compiler `{}`: {e}; install gcc",
                cc()
            ))
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if headers_missing(&stderr) {
            return skip_or_fail(&format!(
                "Xen public headers not found (xen/io/blkif.h): install libxen-dev. Compiler said:\n{stderr}"
            ));
        }
        // The compiler cannot target i386 here: the x86_32 layout is then
        // checked only by the compile-time asserts in xen-sys/src/blkif.rs.
        println!(
            "NOTE: `{} -m32` unavailable; x86_32 layout checked by compile-time asserts only:\n{stderr}",
            cc()
        );
        return;
    }
    let c = parse(&String::from_utf8_lossy(&out.stdout));
    compare("x86_32", &items, &c);
}
