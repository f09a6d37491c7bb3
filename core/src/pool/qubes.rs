//! Pools that Qubes manages: volume settings read from Qubes' `qubes.xml`.
//!
//! Qubes OS keeps a volume's settings (save_on_stop, snap_on_start, source,
//! revisions_to_keep, rw, size) in `qubes.xml`, not in the pool directory. When
//! that file names a pool of driver `file-reflink` whose `dir_path` is this pool's
//! directory, refblk takes each volume's settings from it — read-only, never
//! written — and they win over refblk's own sidecar (docs/pool.md, "Sharing a
//! pool with Qubes").
//!
//! What refblk relies on, learned from Qubes' `qubes/app.py`,
//! `qubes/vm/qubesvm.py` and `qubes/storage/` (the code here is our own):
//! - pools are `/qubes/pools/pool` elements whose attributes are the pool's
//!   config (`name`, `driver`, `dir_path`, `revisions_to_keep`, …);
//! - volumes are `/qubes/domains/domain/volume-config/volume` elements whose
//!   attributes are the volume's config (`name`, `pool`, `vid`,
//!   `revisions_to_keep`, `rw`, `save_on_stop`, `snap_on_start`, `size` when
//!   not 0, `source` = the source volume's vid when there is one);
//! - booleans are written `True`/`False`, numbers in decimal;
//! - a missing `vid` is `<dir_path_prefix>/<vm name>/<volume name>`, the prefix
//!   `vm-templates` for a TemplateVM and `appvms` for every other class;
//! - a snap_on_start volume without `source` takes the same-named volume of its
//!   qube's template (following templates that are snapshots themselves);
//! - a volume without `revisions_to_keep` has its pool's (default 1).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::config::{VolumeConfig, VolumeKind};
use super::error::{ErrorKind, PoolError, Result};

/// Qubes' default location of qubes.xml.
pub const DEFAULT_QUBES_XML: &str = "/var/lib/qubes/qubes.xml";

/// The environment variable naming qubes.xml (`none`: no Qubes).
pub const QUBES_XML_ENV: &str = "REFBLK_QUBES_XML";

/// Where to look for qubes.xml.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum QubesXmlSetting {
    /// [`DEFAULT_QUBES_XML`] if it exists; no Qubes otherwise.
    #[default]
    Auto,
    /// Do not read any qubes.xml.
    Off,
    /// This file; it must exist.
    Path(PathBuf),
}

impl QubesXmlSetting {
    /// From a flag or environment value: empty = auto, `none` = off, else a path.
    pub fn parse(s: &str) -> QubesXmlSetting {
        match s {
            "" => QubesXmlSetting::Auto,
            "none" => QubesXmlSetting::Off,
            p => QubesXmlSetting::Path(PathBuf::from(p)),
        }
    }

    /// From `$REFBLK_QUBES_XML` (auto when unset).
    pub fn from_env() -> QubesXmlSetting {
        std::env::var(QUBES_XML_ENV)
            .map(|s| QubesXmlSetting::parse(&s))
            .unwrap_or_default()
    }
}

/// One volume qubes.xml names in this pool.
#[derive(Debug, Clone)]
pub struct QubesVolume {
    /// The qube it belongs to.
    pub domain: String,
    /// Its name in the qube (`root`, `private`, `volatile`).
    pub name: String,
    /// Its settings, or why they cannot be used.
    pub config: std::result::Result<VolumeConfig, String>,
}

/// What qubes.xml says about one pool directory.
#[derive(Debug, Clone)]
pub struct QubesView {
    /// The file read.
    pub xml: PathBuf,
    /// Qubes' name of the pool.
    pub pool_name: String,
    /// The pool's revisions_to_keep (for volumes without their own).
    pub revisions_to_keep: i64,
    volumes: BTreeMap<String, QubesVolume>,
}

/// The top-level directories in which Qubes' file-reflink driver keeps volumes
/// (it refuses any other prefix).
pub const VOLUME_DIRS: [&str; 2] = ["appvms", "vm-templates"];

impl QubesView {
    /// The volume `vid`, if qubes.xml names it in this pool.
    pub fn volume(&self, vid: &str) -> Option<&QubesVolume> {
        self.volumes.get(vid)
    }

    /// Every volume id qubes.xml names in this pool.
    pub fn vids(&self) -> impl Iterator<Item = &String> {
        self.volumes.keys()
    }

    /// For messages: `qubes.xml /path (pool NAME)`.
    pub fn describe(&self) -> String {
        format!("{} (pool {})", self.xml.display(), self.pool_name)
    }
}

fn invalid(msg: String) -> PoolError {
    PoolError::new(ErrorKind::InvalidInput, msg)
}

/// Read `setting`'s qubes.xml and return what it says about `pool_dir` (already
/// canonical), or None when there is no qubes.xml (auto) or it names no
/// file-reflink pool there.
pub fn load(setting: &QubesXmlSetting, pool_dir: &Path) -> Result<Option<QubesView>> {
    let path = match setting {
        QubesXmlSetting::Off => return Ok(None),
        QubesXmlSetting::Auto => {
            let p = PathBuf::from(DEFAULT_QUBES_XML);
            if !p.exists() {
                return Ok(None);
            }
            p
        }
        QubesXmlSetting::Path(p) => p.clone(),
    };
    let text = fs::read_to_string(&path).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io
        };
        PoolError::new(
            kind,
            format!(
                "cannot read Qubes' settings {}: {e}; give the right file with --qubes-xml PATH, \
                 or --qubes-xml none ({QUBES_XML_ENV}=none) if no Qubes manages this pool",
                path.display()
            ),
        )
    })?;
    parse(&text, &path, pool_dir)
}

/// Parse qubes.xml `text` (read from `path`) for the pool at `pool_dir`.
pub fn parse(text: &str, path: &Path, pool_dir: &Path) -> Result<Option<QubesView>> {
    let doc = roxmltree::Document::parse(text).map_err(|e| {
        invalid(format!(
            "cannot parse Qubes' settings {}: {e}; refblk does not guess the settings of a \
             Qubes pool's volumes: repair the file (qubesd writes it), or pass --qubes-xml none \
             ({QUBES_XML_ENV}=none) if no Qubes manages this pool",
            path.display()
        ))
    })?;
    let root = doc.root_element();
    // The pool: driver file-reflink, dir_path this directory.
    let mut pool = None;
    for p in child(root, "pools")
        .into_iter()
        .flat_map(|ps| child(ps, "pool"))
    {
        if p.attribute("driver") != Some("file-reflink") {
            continue;
        }
        let (Some(name), Some(dir)) = (p.attribute("name"), p.attribute("dir_path")) else {
            continue;
        };
        if same_dir(Path::new(dir), pool_dir) {
            let rtk = match p.attribute("revisions_to_keep") {
                None => 1,
                Some(s) => s.trim().parse::<i64>().map_err(|_| {
                    invalid(format!(
                        "{}: pool {name}: revisions_to_keep {s:?} is not a number; repair the file \
                         (qvm-pool set {name} -o revisions_to_keep=N)",
                        path.display()
                    ))
                })?,
            };
            pool = Some((name.to_string(), rtk));
            break;
        }
    }
    let Some((pool_name, pool_rtk)) = pool else {
        return Ok(None);
    };
    // Global default pools, for volumes without a pool attribute.
    let global: BTreeMap<&str, &str> = child(root, "properties")
        .into_iter()
        .flat_map(|ps| child(ps, "property"))
        .filter_map(|p| Some((p.attribute("name")?, p.text()?.trim())))
        .collect();
    struct Dom<'a, 'i> {
        name: String,
        template: Option<String>,
        prefix: &'static str,
        vols: Vec<roxmltree::Node<'a, 'i>>,
    }
    let mut doms: Vec<Dom<'_, '_>> = Vec::new();
    for d in child(root, "domains")
        .into_iter()
        .flat_map(|ds| child(ds, "domain"))
    {
        let props: BTreeMap<&str, &str> = child(d, "properties")
            .into_iter()
            .flat_map(|ps| child(ps, "property"))
            .filter_map(|p| Some((p.attribute("name")?, p.text().unwrap_or("").trim())))
            .collect();
        let Some(name) = props.get("name").filter(|n| !n.is_empty()) else {
            continue;
        };
        doms.push(Dom {
            name: name.to_string(),
            template: props
                .get("template")
                .filter(|t| !t.is_empty())
                .map(|t| t.to_string()),
            prefix: if d.attribute("class") == Some("TemplateVM") {
                "vm-templates"
            } else {
                "appvms"
            },
            vols: child(d, "volume-config")
                .into_iter()
                .flat_map(|vc| child(vc, "volume"))
                .collect(),
        });
    }
    let find_vol = |dom: &str, vname: &str| {
        doms.iter()
            .find(|d| d.name == dom)
            .and_then(|d| d.vols.iter().find(|v| v.attribute("name") == Some(vname)))
            .map(|v| (doms.iter().find(|d| d.name == dom), *v))
    };
    let vid_of = |d: &Dom<'_, '_>, v: roxmltree::Node<'_, '_>| -> Option<String> {
        match v.attribute("vid") {
            Some(vid) => Some(vid.to_string()),
            None => Some(format!("{}/{}/{}", d.prefix, d.name, v.attribute("name")?)),
        }
    };
    let mut volumes = BTreeMap::new();
    for d in &doms {
        for v in &d.vols {
            let Some(vname) = v.attribute("name") else {
                continue;
            };
            let vpool = v.attribute("pool").or_else(|| {
                global
                    .get(format!("default_pool_{vname}").as_str())
                    .or_else(|| global.get("default_pool"))
                    .copied()
            });
            if vpool != Some(pool_name.as_str()) {
                continue;
            }
            let Some(vid) = vid_of(d, *v) else { continue };
            let where_ = format!("{} (qube {}, volume {vname})", path.display(), d.name);
            let config = volume_config(*v, pool_rtk).and_then(|mut c| {
                if c.kind.snap_on_start() && c.source.is_none() {
                    // the template's same-named volume, through snapshot templates
                    let mut t = d.template.clone();
                    for _ in 0..16 {
                        let Some(tn) = t.take() else { break };
                        let Some((Some(td), tv)) = find_vol(&tn, vname) else {
                            break;
                        };
                        if let Some(s) = tv.attribute("source") {
                            c.source = Some(s.to_string());
                            break;
                        }
                        if tv.attribute("snap_on_start") == Some("True") {
                            t = td.template.clone();
                            continue;
                        }
                        c.source = vid_of(td, tv);
                        break;
                    }
                    if c.source.is_none() {
                        return Err("snap_on_start=True but no source volume (neither a source \
                             attribute nor a template with this volume)"
                            .to_string());
                    }
                }
                c.validate().map_err(|e| e.to_string())?;
                Ok(c)
            });
            let config =
                config.map_err(|m| format!("{where_}: {m}; repair it with qvm-volume / qvm-prefs"));
            volumes.insert(
                vid,
                QubesVolume {
                    domain: d.name.clone(),
                    name: vname.to_string(),
                    config,
                },
            );
        }
    }
    Ok(Some(QubesView {
        xml: path.to_path_buf(),
        pool_name,
        revisions_to_keep: pool_rtk,
        volumes,
    }))
}

/// The child elements of `n` named `tag`.
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Vec<roxmltree::Node<'a, 'i>> {
    n.children()
        .filter(|c| c.is_element() && c.has_tag_name(tag))
        .collect()
}

/// A Qubes boolean attribute: `True`/`False` (missing: `default`).
fn boolean(
    v: roxmltree::Node<'_, '_>,
    attr: &str,
    default: bool,
) -> std::result::Result<bool, String> {
    match v.attribute(attr) {
        None => Ok(default),
        Some("True") => Ok(true),
        Some("False") => Ok(false),
        Some(s) => Err(format!("{attr}={s:?} is neither True nor False")),
    }
}

fn volume_config(
    v: roxmltree::Node<'_, '_>,
    pool_rtk: i64,
) -> std::result::Result<VolumeConfig, String> {
    let save_on_stop = boolean(v, "save_on_stop", false)?;
    let snap_on_start = boolean(v, "snap_on_start", false)?;
    let rw = boolean(v, "rw", true)?;
    let kind = match (save_on_stop, snap_on_start) {
        (true, false) => VolumeKind::Origin,
        (false, true) => VolumeKind::Snapshot,
        (true, true) => VolumeKind::OriginSnapshot,
        (false, false) => VolumeKind::Volatile,
    };
    let mut rtk = match v.attribute("revisions_to_keep") {
        None => pool_rtk,
        Some(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("revisions_to_keep={s:?} is not a number"))?,
    };
    if rtk < -1 {
        return Err(format!("revisions_to_keep={rtk} is below -1"));
    }
    if rtk == -1 && kind != VolumeKind::Origin {
        // Qubes disables snapshots only for plain save_on_stop volumes; the
        // other kinds keep no revisions anyway.
        rtk = 0;
    }
    let size = match v.attribute("size") {
        None => None,
        Some(s) => Some(
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("size={s:?} is not a byte count"))?,
        )
        .filter(|n| *n > 0),
    };
    let source = v
        .attribute("source")
        .filter(|_| snap_on_start)
        .map(str::to_string);
    if let Some(s) = &source {
        super::layout::validate_vid(s).map_err(|m| format!("source: {m}"))?;
    }
    Ok(VolumeConfig {
        kind,
        source,
        revisions_to_keep: rtk,
        size,
        rw,
    })
}

/// Whether `dir_path` (from qubes.xml) is the directory `canonical`.
fn same_dir(dir_path: &Path, canonical: &Path) -> bool {
    match fs::canonicalize(dir_path) {
        Ok(c) => c == canonical,
        Err(_) => dir_path == canonical,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<?xml version='1.0' encoding='UTF-8'?>
<qubes>
  <labels><label id="label-1" color="0xcc0000">red</label></labels>
  <pools>
    <pool dir_path="/srv/other" driver="file-reflink" name="other" revisions_to_keep="2"/>
    <pool dir_path="/srv/pool" driver="file-reflink" name="main" revisions_to_keep="1"/>
    <pool dir_path="/srv/pool/vm-kernels" driver="linux-kernel" name="linux-kernel"/>
  </pools>
  <properties><property name="default_pool_volatile">main</property></properties>
  <domains>
    <domain class="TemplateVM" id="domain-1">
      <properties><property name="name">tpl</property></properties>
      <volume-config>
        <volume name="root" pool="main" vid="vm-templates/tpl/root" revisions_to_keep="1" rw="True" save_on_stop="True" snap_on_start="False" size="4194304"/>
        <volume name="kernel" pool="linux-kernel" vid="6.1" rw="False" save_on_stop="False" snap_on_start="False"/>
      </volume-config>
    </domain>
    <domain class="AppVM" id="domain-2">
      <properties><property name="name">work</property><property name="template" ref="domain-1">tpl</property></properties>
      <volume-config>
        <volume name="root" pool="main" vid="appvms/work/root" revisions_to_keep="0" rw="True" save_on_stop="False" snap_on_start="True" source="vm-templates/tpl/root" size="4194304"/>
        <volume name="private" pool="main" revisions_to_keep="3" rw="True" save_on_stop="True" snap_on_start="False" size="2097152"/>
        <volume name="volatile" rw="True" save_on_stop="False" snap_on_start="False" size="1048576"/>
      </volume-config>
    </domain>
    <domain class="DispVM" id="domain-3">
      <properties><property name="name">disp1</property><property name="template">work</property></properties>
      <volume-config>
        <volume name="root" pool="main" vid="appvms/disp1/root" rw="True" save_on_stop="False" snap_on_start="True"/>
        <volume name="private" pool="main" vid="appvms/disp1/private" rw="True" save_on_stop="maybe" snap_on_start="False"/>
      </volume-config>
    </domain>
  </domains>
</qubes>"#;

    fn view() -> QubesView {
        parse(XML, Path::new("/x/qubes.xml"), Path::new("/srv/pool"))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn volumes_of_the_pool_with_their_settings() {
        let v = view();
        assert_eq!(v.pool_name, "main");
        let vids: Vec<_> = v.vids().cloned().collect();
        assert_eq!(
            vids,
            [
                "appvms/disp1/private",
                "appvms/disp1/root",
                "appvms/work/private",
                "appvms/work/root",
                "appvms/work/volatile",
                "vm-templates/tpl/root"
            ]
        );
        let c = |vid: &str| v.volume(vid).unwrap().config.clone().unwrap();
        let p = c("appvms/work/private");
        assert_eq!(
            (p.kind, p.revisions_to_keep, p.size),
            (VolumeKind::Origin, 3, Some(2 << 20))
        );
        let r = c("appvms/work/root");
        assert_eq!(r.kind, VolumeKind::Snapshot);
        assert_eq!(r.source.as_deref(), Some("vm-templates/tpl/root"));
        assert_eq!(c("appvms/work/volatile").kind, VolumeKind::Volatile);
        // no source attribute: the template's (a snapshot itself) source
        assert_eq!(
            c("appvms/disp1/root").source.as_deref(),
            Some("vm-templates/tpl/root")
        );
        let bad = v.volume("appvms/disp1/private").unwrap().config.clone();
        assert!(bad.unwrap_err().contains("save_on_stop=\"maybe\""));
    }

    #[test]
    fn other_directories_and_bad_files() {
        assert!(parse(XML, Path::new("q"), Path::new("/srv/elsewhere"))
            .unwrap()
            .is_none());
        let e = parse(
            "<qubes><pools>",
            Path::new("/x/q.xml"),
            Path::new("/srv/pool"),
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(
            e.msg.contains("/x/q.xml") && e.msg.contains("--qubes-xml none"),
            "{}",
            e.msg
        );
        let e = load(
            &QubesXmlSetting::Path("/nonexistent/qubes.xml".into()),
            Path::new("/srv/pool"),
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{}", e.msg);
    }
}
