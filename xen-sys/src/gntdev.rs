//! Linux `/dev/xen/gntdev` ABI (`include/uapi/xen/gntdev.h`) and the grant-table
//! flags it relies on (`xen/include/public/grant_table.h`).
//!
//! All ioctls are `_IOC(_IOC_NONE, 'G', nr, sizeof(struct ...))`; the numbers are
//! computed with [`ioc_none`] from the struct sizes asserted below.

#![allow(non_camel_case_types, non_upper_case_globals)]

use core::mem::{offset_of, size_of};

/// `_IOC(_IOC_NONE, ty, nr, size)` on Linux (x86, arm, riscv: dir bits 30..31 = 0,
/// size bits 16..29, type bits 8..15, nr bits 0..7).
pub const fn ioc_none(ty: u8, nr: u8, size: usize) -> u32 {
    ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

/// `struct ioctl_gntdev_grant_ref`: one grant to map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ioctl_gntdev_grant_ref {
    /// The granting domain.
    pub domid: u32,
    /// The grant reference.
    pub ref_: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` with its one-element trailing array. The
/// real call passes `count` refs: callers allocate `size_of::<Self>() + (count - 1)
/// * size_of::<ioctl_gntdev_grant_ref>()` bytes, 8-byte aligned.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_map_grant_ref {
    /// IN: number of refs.
    pub count: u32,
    pub pad: u32,
    /// OUT: the offset to pass to `mmap()`.
    pub index: u64,
    /// IN: `count` refs (variable length).
    pub refs: [ioctl_gntdev_grant_ref; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_unmap_grant_ref {
    /// The index returned by MAP_GRANT_REF.
    pub index: u64,
    /// Number of pages.
    pub count: u32,
    pub pad: u32,
}

/// `struct ioctl_gntdev_unmap_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_unmap_notify {
    /// Offset (as used with `mmap()`) of a byte within the mapped page.
    pub index: u64,
    /// `UNMAP_NOTIFY_*` bits.
    pub action: u32,
    /// Event channel port to notify (with `UNMAP_NOTIFY_SEND_EVENT`).
    pub event_channel_port: u32,
}

/// The `foreign` member of the grant copy source/dest union.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct gntdev_grant_copy_foreign {
    pub ref_: u32,
    pub offset: u16,
    pub domid: u16,
}

/// The source/dest union of `struct ioctl_gntdev_grant_copy_segment`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union gntdev_grant_copy_ptr {
    /// Local virtual address (when the matching `GNTCOPY_*_gref` flag is clear).
    pub virt: *mut core::ffi::c_void,
    /// A foreign grant (when the flag is set).
    pub foreign: gntdev_grant_copy_foreign,
}

/// `struct ioctl_gntdev_grant_copy_segment`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ioctl_gntdev_grant_copy_segment {
    pub source: gntdev_grant_copy_ptr,
    pub dest: gntdev_grant_copy_ptr,
    pub len: u16,
    /// `GNTCOPY_source_gref` / `GNTCOPY_dest_gref`.
    pub flags: u16,
    /// OUT: `GNTST_*`.
    pub status: i16,
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ioctl_gntdev_grant_copy {
    pub count: u32,
    pub segments: *mut ioctl_gntdev_grant_copy_segment,
}

pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 =
    ioc_none(b'G', 0, size_of::<ioctl_gntdev_map_grant_ref>());
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 =
    ioc_none(b'G', 1, size_of::<ioctl_gntdev_unmap_grant_ref>());
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 =
    ioc_none(b'G', 7, size_of::<ioctl_gntdev_unmap_notify>());
pub const IOCTL_GNTDEV_GRANT_COPY: u32 = ioc_none(b'G', 8, size_of::<ioctl_gntdev_grant_copy>());

/// Clear the byte at `index` when the mapping goes away.
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// Send an event on `event_channel_port` when the mapping goes away.
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

/// Grant copy segment flags (`grant_table.h`).
pub const GNTCOPY_source_gref: u16 = 1 << 0;
pub const GNTCOPY_dest_gref: u16 = 1 << 1;

/// Grant entry v1 flags (`grant_table.h`, `grant_entry_v1.flags`).
pub const GTF_invalid: u16 = 0;
pub const GTF_permit_access: u16 = 1;
pub const GTF_accept_transfer: u16 = 2;
pub const GTF_transitive: u16 = 3;
pub const GTF_type_mask: u16 = 3;
pub const GTF_readonly: u16 = 1 << 2;
pub const GTF_reading: u16 = 1 << 3;
pub const GTF_writing: u16 = 1 << 4;

/// `grant_entry_v1_t`: the guest-written grant table entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct grant_entry_v1 {
    pub flags: u16,
    pub domid: u16,
    pub frame: u32,
}

/// Refs 0..8 are reserved for the toolstack (`GNTTAB_NR_RESERVED_ENTRIES`).
pub const GNTTAB_NR_RESERVED_ENTRIES: u32 = 8;

const _: () = {
    assert!(size_of::<ioctl_gntdev_grant_ref>() == 8);
    assert!(size_of::<ioctl_gntdev_map_grant_ref>() == 24);
    assert!(offset_of!(ioctl_gntdev_map_grant_ref, index) == 8);
    assert!(offset_of!(ioctl_gntdev_map_grant_ref, refs) == 16);
    assert!(size_of::<ioctl_gntdev_unmap_grant_ref>() == 16);
    assert!(size_of::<ioctl_gntdev_unmap_notify>() == 16);
    assert!(size_of::<gntdev_grant_copy_foreign>() == 8);
    assert!(size_of::<gntdev_grant_copy_ptr>() == 8);
    assert!(size_of::<ioctl_gntdev_grant_copy_segment>() == 24);
    assert!(offset_of!(ioctl_gntdev_grant_copy_segment, dest) == 8);
    assert!(offset_of!(ioctl_gntdev_grant_copy_segment, len) == 16);
    assert!(offset_of!(ioctl_gntdev_grant_copy_segment, flags) == 18);
    assert!(offset_of!(ioctl_gntdev_grant_copy_segment, status) == 20);
    assert!(size_of::<ioctl_gntdev_grant_copy>() == 16);
    assert!(offset_of!(ioctl_gntdev_grant_copy, segments) == 8);
    assert!(size_of::<grant_entry_v1>() == 8);
    // The numbers as Linux computes them (checked by hand against _IOC).
    assert!(IOCTL_GNTDEV_MAP_GRANT_REF == 0x0018_4700);
    assert!(IOCTL_GNTDEV_UNMAP_GRANT_REF == 0x0010_4701);
    assert!(IOCTL_GNTDEV_SET_UNMAP_NOTIFY == 0x0010_4707);
    assert!(IOCTL_GNTDEV_GRANT_COPY == 0x0010_4708);
};

/// Compare our numbers and sizes with Debian's `libxen-dev` copies of the Linux
/// uapi headers (`/usr/include/xen/sys/{gntdev,evtchn}.h`) by compiling a small C
/// program.
#[cfg(test)]
mod c_header_check {
    use super::*;
    use crate::evtchn::*;
    use std::process::Command;

    const PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
typedef uint16_t domid_t;
#include <xen/sys/gntdev.h>
#include <xen/sys/evtchn.h>
#define P(x) printf(#x " %lu\n", (unsigned long)(x))
int main(void) {
    P(IOCTL_GNTDEV_MAP_GRANT_REF); P(IOCTL_GNTDEV_UNMAP_GRANT_REF);
    P(IOCTL_GNTDEV_SET_UNMAP_NOTIFY); P(IOCTL_GNTDEV_GRANT_COPY);
    P(UNMAP_NOTIFY_CLEAR_BYTE); P(UNMAP_NOTIFY_SEND_EVENT);
    P(sizeof(struct ioctl_gntdev_grant_copy_segment));
    P(offsetof(struct ioctl_gntdev_grant_copy_segment, len));
    P(offsetof(struct ioctl_gntdev_grant_copy_segment, status));
    P(offsetof(struct ioctl_gntdev_grant_copy, segments));
    P(IOCTL_EVTCHN_BIND_VIRQ); P(IOCTL_EVTCHN_BIND_INTERDOMAIN);
    P(IOCTL_EVTCHN_BIND_UNBOUND_PORT); P(IOCTL_EVTCHN_UNBIND);
    P(IOCTL_EVTCHN_NOTIFY); P(IOCTL_EVTCHN_RESET);
    return 0;
}
"#;

    #[test]
    fn numbers_match_the_c_headers() {
        let header = std::path::Path::new("/usr/include/xen/sys/gntdev.h");
        if !header.exists() {
            let msg = "no /usr/include/xen/sys/gntdev.h: install libxen-dev (scripts/test does)";
            if std::env::var("REFBLK_ALLOW_SKIP").as_deref() == Ok("1") {
                println!("SKIP: {msg}");
                return;
            }
            panic!("{msg}");
        }
        let dir = std::env::temp_dir().join(format!("xen-sys-ioctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let src = dir.join("ioctl.c");
        let exe = dir.join("ioctl");
        std::fs::write(&src, PROGRAM).expect("write C program");
        let cc = Command::new("cc")
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .output()
            .expect("run cc");
        assert!(
            cc.status.success(),
            "cc failed: {}",
            String::from_utf8_lossy(&cc.stderr)
        );
        let out = Command::new(&exe).output().expect("run C program");
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8(out.stdout).expect("utf8");
        let got: std::collections::HashMap<&str, u64> = text
            .lines()
            .filter_map(|l| l.rsplit_once(" "))
            .map(|(k, v)| (k, v.parse().expect("number")))
            .collect();
        let want: &[(&str, u64)] = &[
            (
                "IOCTL_GNTDEV_MAP_GRANT_REF",
                IOCTL_GNTDEV_MAP_GRANT_REF.into(),
            ),
            (
                "IOCTL_GNTDEV_UNMAP_GRANT_REF",
                IOCTL_GNTDEV_UNMAP_GRANT_REF.into(),
            ),
            (
                "IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
                IOCTL_GNTDEV_SET_UNMAP_NOTIFY.into(),
            ),
            ("IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY.into()),
            ("UNMAP_NOTIFY_CLEAR_BYTE", UNMAP_NOTIFY_CLEAR_BYTE.into()),
            ("UNMAP_NOTIFY_SEND_EVENT", UNMAP_NOTIFY_SEND_EVENT.into()),
            (
                "sizeof(struct ioctl_gntdev_grant_copy_segment)",
                size_of::<ioctl_gntdev_grant_copy_segment>() as u64,
            ),
            (
                "offsetof(struct ioctl_gntdev_grant_copy_segment, len)",
                offset_of!(ioctl_gntdev_grant_copy_segment, len) as u64,
            ),
            (
                "offsetof(struct ioctl_gntdev_grant_copy_segment, status)",
                offset_of!(ioctl_gntdev_grant_copy_segment, status) as u64,
            ),
            (
                "offsetof(struct ioctl_gntdev_grant_copy, segments)",
                offset_of!(ioctl_gntdev_grant_copy, segments) as u64,
            ),
            ("IOCTL_EVTCHN_BIND_VIRQ", IOCTL_EVTCHN_BIND_VIRQ.into()),
            (
                "IOCTL_EVTCHN_BIND_INTERDOMAIN",
                IOCTL_EVTCHN_BIND_INTERDOMAIN.into(),
            ),
            (
                "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
                IOCTL_EVTCHN_BIND_UNBOUND_PORT.into(),
            ),
            ("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND.into()),
            ("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY.into()),
            ("IOCTL_EVTCHN_RESET", IOCTL_EVTCHN_RESET.into()),
        ];
        for (name, value) in want {
            assert_eq!(
                got.get(name),
                Some(value),
                "{name}: C says {:?}, we say {value}",
                got.get(name)
            );
        }
    }
}
