//! xen-sys's xenstore wire ABI against Debian's libxen-dev header
//! `xen/io/xs_wire.h`: a small C program prints every message type, the error
//! table, the limits and the layouts; we compare with our constants.
//!
//! Needs a C compiler and libxen-dev (scripts/test installs it); FAILS without
//! them unless REFBLK_ALLOW_SKIP=1.

use std::collections::HashMap;
use std::process::Command;

use xen_sys::xs_wire as abi;

const PROGRAM: &str = r#"
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/io/xs_wire.h>

#define T(x) printf(#x " %d\n", (int)(x));
int main(void) {
    T(XS_CONTROL) T(XS_DEBUG) T(XS_DIRECTORY) T(XS_READ) T(XS_GET_PERMS)
    T(XS_WATCH) T(XS_UNWATCH) T(XS_TRANSACTION_START) T(XS_TRANSACTION_END)
    T(XS_INTRODUCE) T(XS_RELEASE) T(XS_GET_DOMAIN_PATH) T(XS_WRITE) T(XS_MKDIR)
    T(XS_RM) T(XS_SET_PERMS) T(XS_WATCH_EVENT) T(XS_ERROR)
    T(XS_IS_DOMAIN_INTRODUCED) T(XS_RESUME) T(XS_SET_TARGET)
    T(XS_RESET_WATCHES) T(XS_DIRECTORY_PART) T(XS_TYPE_COUNT) T(XS_INVALID)
    T(XS_WATCH_PATH) T(XS_WATCH_TOKEN)
    T(XENSTORE_PAYLOAD_MAX) T(XENSTORE_ABS_PATH_MAX) T(XENSTORE_REL_PATH_MAX)
    T(XENSTORE_RING_SIZE)
    T(sizeof(struct xsd_sockmsg))
    T(offsetof(struct xsd_sockmsg, type)) T(offsetof(struct xsd_sockmsg, req_id))
    T(offsetof(struct xsd_sockmsg, tx_id)) T(offsetof(struct xsd_sockmsg, len))
    T(sizeof(struct xenstore_domain_interface))
    T(offsetof(struct xenstore_domain_interface, rsp))
    T(offsetof(struct xenstore_domain_interface, req_cons))
    T(offsetof(struct xenstore_domain_interface, req_prod))
    T(offsetof(struct xenstore_domain_interface, rsp_cons))
    T(offsetof(struct xenstore_domain_interface, rsp_prod))
    T(offsetof(struct xenstore_domain_interface, server_features))
    T(offsetof(struct xenstore_domain_interface, connection))
    T(offsetof(struct xenstore_domain_interface, error))
    for (unsigned i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)
        printf("err%u %d %s\n", i, xsd_errors[i].errnum, xsd_errors[i].errstring);
    return 0;
}
"#;

fn skip_or_fail(msg: String) {
    if std::env::var("REFBLK_ALLOW_SKIP").as_deref() == Ok("1") {
        println!("SKIP: {msg}");
        return;
    }
    panic!("{msg}");
}

#[test]
fn xs_wire_matches_the_c_header() {
    if !std::path::Path::new("/usr/include/xen/io/xs_wire.h").exists() {
        return skip_or_fail(
            "/usr/include/xen/io/xs_wire.h missing: install libxen-dev (scripts/test does)".into(),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("xs.c");
    let bin = dir.path().join("xs");
    std::fs::write(&src, PROGRAM).unwrap();
    let cc = match Command::new("cc").arg("-o").arg(&bin).arg(&src).output() {
        Ok(o) => o,
        Err(e) => return skip_or_fail(format!("no C compiler (cc): {e}")),
    };
    assert!(
        cc.status.success(),
        "compiling against xs_wire.h failed: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&bin).output().expect("run the C program");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut c: HashMap<String, i64> = HashMap::new();
    let mut errors = Vec::new();
    for line in text.lines() {
        if line.starts_with("err") {
            let f: Vec<&str> = line.split_whitespace().collect();
            errors.push((f[1].parse::<i32>().unwrap(), f[2].to_string()));
        } else {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            c.insert(name.to_string(), value.parse().unwrap());
        }
    }
    let ours: &[(&str, i64)] = &[
        ("XS_CONTROL", abi::XS_CONTROL as i64),
        ("XS_DEBUG", abi::XS_DEBUG as i64),
        ("XS_DIRECTORY", abi::XS_DIRECTORY as i64),
        ("XS_READ", abi::XS_READ as i64),
        ("XS_GET_PERMS", abi::XS_GET_PERMS as i64),
        ("XS_WATCH", abi::XS_WATCH as i64),
        ("XS_UNWATCH", abi::XS_UNWATCH as i64),
        ("XS_TRANSACTION_START", abi::XS_TRANSACTION_START as i64),
        ("XS_TRANSACTION_END", abi::XS_TRANSACTION_END as i64),
        ("XS_INTRODUCE", abi::XS_INTRODUCE as i64),
        ("XS_RELEASE", abi::XS_RELEASE as i64),
        ("XS_GET_DOMAIN_PATH", abi::XS_GET_DOMAIN_PATH as i64),
        ("XS_WRITE", abi::XS_WRITE as i64),
        ("XS_MKDIR", abi::XS_MKDIR as i64),
        ("XS_RM", abi::XS_RM as i64),
        ("XS_SET_PERMS", abi::XS_SET_PERMS as i64),
        ("XS_WATCH_EVENT", abi::XS_WATCH_EVENT as i64),
        ("XS_ERROR", abi::XS_ERROR as i64),
        (
            "XS_IS_DOMAIN_INTRODUCED",
            abi::XS_IS_DOMAIN_INTRODUCED as i64,
        ),
        ("XS_RESUME", abi::XS_RESUME as i64),
        ("XS_SET_TARGET", abi::XS_SET_TARGET as i64),
        ("XS_RESET_WATCHES", abi::XS_RESET_WATCHES as i64),
        ("XS_DIRECTORY_PART", abi::XS_DIRECTORY_PART as i64),
        ("XS_TYPE_COUNT", abi::XS_TYPE_COUNT as i64),
        ("XS_INVALID", abi::XS_INVALID as i64),
        ("XS_WATCH_PATH", abi::XS_WATCH_PATH as i64),
        ("XS_WATCH_TOKEN", abi::XS_WATCH_TOKEN as i64),
        ("XENSTORE_PAYLOAD_MAX", abi::XENSTORE_PAYLOAD_MAX as i64),
        ("XENSTORE_ABS_PATH_MAX", abi::XENSTORE_ABS_PATH_MAX as i64),
        ("XENSTORE_REL_PATH_MAX", abi::XENSTORE_REL_PATH_MAX as i64),
        ("XENSTORE_RING_SIZE", abi::XENSTORE_RING_SIZE as i64),
        (
            "sizeof(struct xsd_sockmsg)",
            std::mem::size_of::<abi::xsd_sockmsg>() as i64,
        ),
        (
            "offsetof(struct xsd_sockmsg, type)",
            std::mem::offset_of!(abi::xsd_sockmsg, type_) as i64,
        ),
        (
            "offsetof(struct xsd_sockmsg, req_id)",
            std::mem::offset_of!(abi::xsd_sockmsg, req_id) as i64,
        ),
        (
            "offsetof(struct xsd_sockmsg, tx_id)",
            std::mem::offset_of!(abi::xsd_sockmsg, tx_id) as i64,
        ),
        (
            "offsetof(struct xsd_sockmsg, len)",
            std::mem::offset_of!(abi::xsd_sockmsg, len) as i64,
        ),
        (
            "sizeof(struct xenstore_domain_interface)",
            std::mem::size_of::<abi::xenstore_domain_interface>() as i64,
        ),
        (
            "offsetof(struct xenstore_domain_interface, rsp)",
            std::mem::offset_of!(abi::xenstore_domain_interface, rsp) as i64,
        ),
        (
            "offsetof(struct xenstore_domain_interface, req_cons)",
            std::mem::offset_of!(abi::xenstore_domain_interface, req_cons) as i64,
        ),
        (
            "offsetof(struct xenstore_domain_interface, req_prod)",
            std::mem::offset_of!(abi::xenstore_domain_interface, req_prod) as i64,
        ),
        (
            "offsetof(struct xenstore_domain_interface, rsp_cons)",
            std::mem::offset_of!(abi::xenstore_domain_interface, rsp_cons) as i64,
        ),
        (
            "offsetof(struct xenstore_domain_interface, rsp_prod)",
            std::mem::offset_of!(abi::xenstore_domain_interface, rsp_prod) as i64,
        ),
        (
            "offsetof(struct xenstore_domain_interface, server_features)",
            std::mem::offset_of!(abi::xenstore_domain_interface, server_features) as i64,
        ),
        (
            "offsetof(struct xenstore_domain_interface, connection)",
            std::mem::offset_of!(abi::xenstore_domain_interface, connection) as i64,
        ),
        (
            "offsetof(struct xenstore_domain_interface, error)",
            std::mem::offset_of!(abi::xenstore_domain_interface, error) as i64,
        ),
    ];
    for (name, value) in ours {
        assert_eq!(
            c.get(*name),
            Some(value),
            "{name}: C header says {:?}, xen-sys says {value}",
            c.get(*name)
        );
    }
    assert_eq!(c.len(), ours.len(), "every C value was compared");
    let ours_err: Vec<(i32, String)> = abi::XSD_ERRORS
        .iter()
        .map(|e| (e.errnum, e.errstring.to_string()))
        .collect();
    assert_eq!(errors, ours_err, "xsd_errors table (order matters)");
}
