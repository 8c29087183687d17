//! The guest kernels' package versions, pinned. A run fetches exactly these;
//! when the mirror no longer carries one, the run fails and names the newest
//! package there, and a person updates the line below (and the README's
//! matrix) on purpose. A newer upload that leaves the pinned one in place only
//! earns a note.

use super::KernelKind;

/// One Debian archive line, `deb <archive> <suite> main`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    /// `$NUMAPIN_DEBIAN_MIRROR`, default `http://deb.debian.org/debian`.
    Debian,
    /// `$NUMAPIN_DEBIAN_SECURITY_MIRROR`, default `http://deb.debian.org/debian-security`.
    Security,
}

impl Archive {
    pub fn url(self) -> String {
        let (var, default) = match self {
            Archive::Debian => ("NUMAPIN_DEBIAN_MIRROR", "http://deb.debian.org/debian"),
            Archive::Security => (
                "NUMAPIN_DEBIAN_SECURITY_MIRROR",
                "http://deb.debian.org/debian-security",
            ),
        };
        std::env::var(var)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| default.to_owned())
    }
}

/// A kernel package at one version, and where it comes from.
#[derive(Debug)]
pub struct Pin {
    pub kind: KernelKind,
    /// The suites a private apt state reads (never the system's sources).
    pub sources: &'static [(Archive, &'static str)],
    /// The metapackage whose dependency names the newest package of this
    /// line (`linux-image-amd64` → `linux-image-6.1.0-57-amd64`): what the
    /// failure message proposes when the pin is gone.
    pub meta: &'static str,
    /// The versioned package: a kernel image, or `linux-source-X.Y`.
    pub package: &'static str,
    pub version: &'static str,
}

impl Pin {
    /// The name of the private apt state under the cache (`apt-<label>`).
    pub fn apt_label(&self) -> String {
        self.sources
            .iter()
            .map(|(_, suite)| *suite)
            .collect::<Vec<_>>()
            .join("+")
    }

    /// `bookworm bookworm-security` (for messages).
    pub fn suites(&self) -> String {
        self.sources
            .iter()
            .map(|(_, suite)| *suite)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Debian 12's kernel is published through the security archive between
/// point releases, so both are read.
const BOOKWORM: &[(Archive, &str)] = &[
    (Archive::Debian, "bookworm"),
    (Archive::Debian, "bookworm-updates"),
    (Archive::Security, "bookworm-security"),
];
const TRIXIE: &[(Archive, &str)] = &[
    (Archive::Debian, "trixie"),
    (Archive::Debian, "trixie-updates"),
    (Archive::Security, "trixie-security"),
];
const TRIXIE_BACKPORTS: &[(Archive, &str)] = &[(Archive::Debian, "trixie-backports")];

/// Every pinned kernel. From 7.x Debian's `linux-image-<abi>` is itself a
/// metapackage over `linux-binary-<abi>` (vmlinuz under
/// /usr/lib/modules/<abi>/), `linux-modules-<abi>` (`.ko.xz`) and
/// `linux-base-<abi>` (the config); `stock` fetches whichever layout it finds.
pub const PINS: &[Pin] = &[
    Pin {
        kind: KernelKind::Stock,
        sources: BOOKWORM,
        meta: "linux-image-amd64",
        package: "linux-image-6.1.0-57-amd64",
        version: "6.1.192-3",
    },
    Pin {
        kind: KernelKind::Trixie,
        sources: TRIXIE,
        meta: "linux-image-amd64",
        package: "linux-image-6.12.118+deb13-amd64",
        version: "6.12.118-1",
    },
    Pin {
        kind: KernelKind::Backports,
        sources: TRIXIE_BACKPORTS,
        meta: "linux-image-amd64",
        package: "linux-image-7.3.4+deb13-amd64",
        version: "7.3.4-1~bpo13+1",
    },
    Pin {
        kind: KernelKind::Custom,
        sources: TRIXIE_BACKPORTS,
        meta: "linux-source",
        package: "linux-source-7.3",
        version: "7.3.4-1~bpo13+1",
    },
];

/// The pin of `kind` (every kind has exactly one).
pub fn of(kind: KernelKind) -> &'static Pin {
    PINS.iter()
        .find(|p| p.kind == kind)
        .expect("every KernelKind has a pin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_pin() {
        for kind in KernelKind::ALL {
            assert_eq!(
                PINS.iter().filter(|p| p.kind == *kind).count(),
                1,
                "{kind:?}"
            );
            assert_eq!(of(*kind).kind, *kind);
        }
        assert_eq!(PINS.len(), KernelKind::ALL.len());
    }

    #[test]
    fn pins_name_a_versioned_package() {
        for p in PINS {
            let prefix = if p.kind == KernelKind::Custom {
                "linux-source-"
            } else {
                "linux-image-"
            };
            let rest = p.package.strip_prefix(prefix).unwrap();
            assert!(
                rest.starts_with(|c: char| c.is_ascii_digit()),
                "{}",
                p.package
            );
            // The upstream version in the package's version matches its name.
            let upstream = p.version.split(['-', '~']).next().unwrap();
            let series: String = upstream.split('.').take(2).collect::<Vec<_>>().join(".");
            assert!(rest.starts_with(&series), "{} {}", p.package, p.version);
        }
        assert_eq!(
            of(KernelKind::Stock).apt_label(),
            "bookworm+bookworm-updates+bookworm-security"
        );
    }
}
