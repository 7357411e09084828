//! What the host says about a PCI function before we touch VFIO: does it exist, is there an
//! IOMMU, which group is it in, is it bound to `vfio-pci`, and is every other member of its
//! group free. Everything comes from sysfs (a root directory parameter lets tests use a
//! fabricated tree), so each problem gets an error that names it and says what to do.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::VfioError;

/// The driver a function must be bound to.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// A PCI function address, `DDDD:BB:DD.F`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PciAddress {
    /// Segment (domain).
    pub domain: u16,
    /// Bus.
    pub bus: u8,
    /// Device (slot), 0..32.
    pub device: u8,
    /// Function, 0..8.
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = VfioError;

    /// `DDDD:BB:DD.F`, or `BB:DD.F` in segment 0 (hex, as `lspci` prints them).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VfioError::BadAddress(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, rest) = match parts.as_slice() {
            [d, b, r] => (*d, *b, *r),
            [b, r] => ("0", *b, *r),
            _ => return Err(bad()),
        };
        let (device, function) = rest.split_once('.').ok_or_else(bad)?;
        let hex = |t: &str, max: u32| {
            if t.is_empty() || t.len() > 4 {
                return None;
            }
            u32::from_str_radix(t, 16).ok().filter(|v| *v <= max)
        };
        Ok(PciAddress {
            domain: hex(domain, 0xffff).ok_or_else(bad)? as u16,
            bus: hex(bus, 0xff).ok_or_else(bad)? as u8,
            device: hex(device, 0x1f).ok_or_else(bad)? as u8,
            function: hex(function, 7).ok_or_else(bad)? as u8,
        })
    }
}

/// A function that passed every host-side check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDevice {
    /// Its address.
    pub address: PciAddress,
    /// Its IOMMU group number.
    pub group: u32,
    /// Its sysfs directory.
    pub sysfs: PathBuf,
}

fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Checks `address` under sysfs root `sys` (normally `/sys`).
pub fn check(sys: &Path, address: PciAddress) -> Result<HostDevice, VfioError> {
    let dir = sys.join("bus/pci/devices").join(address.to_string());
    if !dir.exists() {
        return Err(VfioError::NoSuchDevice(address));
    }
    let group = match link_name(&dir.join("iommu_group")) {
        Some(name) => name
            .parse::<u32>()
            .map_err(|_| VfioError::NoIommu(address))?,
        None => return Err(VfioError::NoIommu(address)),
    };
    match link_name(&dir.join("driver")) {
        Some(d) if d == VFIO_DRIVER => {}
        driver => {
            return Err(VfioError::NotBound {
                address,
                driver: driver.unwrap_or_else(|| "no driver".to_string()),
            })
        }
    }
    // The kernel refuses a group while any member is bound to a host driver (bridges and
    // unbound functions are fine): name them.
    let members = sys.join(format!("kernel/iommu_groups/{group}/devices"));
    let mut busy = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&members) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == address.to_string() {
                continue;
            }
            let other = sys.join("bus/pci/devices").join(&name);
            if let Some(driver) = link_name(&other.join("driver")) {
                if driver != VFIO_DRIVER && driver != "pcieport" {
                    busy.push(format!("{name} (bound to {driver})"));
                }
            }
        }
    }
    if !busy.is_empty() {
        busy.sort();
        return Err(VfioError::GroupNotViable {
            group,
            address,
            others: busy.join(", "),
        });
    }
    Ok(HostDevice {
        address,
        group,
        sysfs: dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn addr(s: &str) -> PciAddress {
        s.parse().expect("address")
    }

    /// A fabricated sysfs: `devices` are (address, group, driver).
    fn sysfs(devices: &[(&str, Option<u32>, Option<&str>)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        for (a, group, driver) in devices {
            let dir = r.join("bus/pci/devices").join(a);
            std::fs::create_dir_all(&dir).expect("mkdir");
            if let Some(g) = group {
                let gdir = r.join(format!("kernel/iommu_groups/{g}/devices"));
                std::fs::create_dir_all(&gdir).expect("mkdir");
                symlink(&dir, gdir.join(a)).expect("symlink");
                symlink(
                    r.join(format!("kernel/iommu_groups/{g}")),
                    dir.join("iommu_group"),
                )
                .expect("symlink");
            }
            if let Some(d) = driver {
                let ddir = r.join("bus/pci/drivers").join(d);
                std::fs::create_dir_all(&ddir).expect("mkdir");
                symlink(&ddir, dir.join("driver")).expect("symlink");
            }
        }
        root
    }

    #[test]
    fn addresses_parse_and_print() {
        assert_eq!(addr("0000:00:04.0").to_string(), "0000:00:04.0");
        assert_eq!(addr("3:1f.7").to_string(), "0000:03:1f.7");
        assert_eq!(addr("0001:aB:10.2").to_string(), "0001:ab:10.2");
        for bad in [
            "",
            "00:04",
            "00:20.0",
            "00:04.8",
            "x:00:04.0",
            "0:0:0:0.0",
            "00:04.",
            "12345:00:00.0",
        ] {
            let e = bad.parse::<PciAddress>().expect_err(bad);
            assert!(e.to_string().contains("PCI address"), "{e}");
        }
    }

    #[test]
    fn a_free_function_in_its_own_group_passes() {
        let root = sysfs(&[("0000:00:04.0", Some(7), Some("vfio-pci"))]);
        let dev = check(root.path(), addr("0000:00:04.0")).expect("ok");
        assert_eq!(dev.group, 7);
    }

    #[test]
    fn each_host_problem_has_its_own_message() {
        let root = sysfs(&[
            ("0000:00:04.0", Some(3), Some("nvme")),
            ("0000:00:05.0", None, Some("vfio-pci")),
            ("0000:00:06.0", Some(4), None),
            ("0000:00:07.0", Some(5), Some("vfio-pci")),
            ("0000:00:08.0", Some(5), Some("e1000e")),
            ("0000:00:09.0", Some(5), None),
        ]);
        let msg = |a: &str| check(root.path(), addr(a)).expect_err(a).to_string();
        assert_eq!(
            msg("0000:00:1f.0"),
            "PCI device 0000:00:1f.0 not found on this host"
        );
        assert_eq!(
            msg("0000:00:04.0"),
            "PCI device 0000:00:04.0 is bound to nvme, not vfio-pci \
             (unbind it and bind it to vfio-pci first)"
        );
        assert!(msg("0000:00:05.0").starts_with("no IOMMU for PCI device 0000:00:05.0"));
        assert!(msg("0000:00:06.0").contains("bound to no driver"));
        assert_eq!(
            msg("0000:00:07.0"),
            "IOMMU group 5 of 0000:00:07.0 also holds devices in use by the host: \
             0000:00:08.0 (bound to e1000e)"
        );
    }
}
