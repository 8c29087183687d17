//! Lowering this thread's effective capabilities for a measurement or a
//! scenario, for the guest programs (the VM suite and the bench). Shared by
//! path: `#[path = "../common/caps.rs"] mod caps;`. Written over capget(2)
//! and capset(2) by hand: the two structs and one version constant are all
//! it needs.

/// `CAP_IPC_LOCK` from `<linux/capability.h>`.
#[allow(dead_code)]
pub const CAP_IPC_LOCK: u32 = 14;
/// `CAP_SYS_ADMIN`.
#[allow(dead_code)]
pub const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_SYS_RESOURCE`.
#[allow(dead_code)]
pub const CAP_SYS_RESOURCE: u32 = 24;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_V3: u32 = 0x2008_0522;

fn capget() -> Result<[CapData; 2], String> {
    let mut h = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut d = [CapData::default(); 2];
    // SAFETY: a v3 header and two data structs, as capget(2) takes.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    if r != 0 {
        return Err(format!("capget: {}", std::io::Error::last_os_error()));
    }
    Ok(d)
}

fn capset(d: &[CapData; 2]) -> Result<(), String> {
    let mut h = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    // SAFETY: as in capget; the kernel only reads the data.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) };
    if r != 0 {
        return Err(format!("capset: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// This thread's effective capabilities, lowered and raised again on drop
/// (capabilities are per thread; they stay permitted, so raising them back
/// is allowed).
pub struct Effective {
    saved: [u32; 2],
}

impl Effective {
    /// Takes `caps` (capability numbers) out of the effective set.
    pub fn lower(caps: &[u32]) -> Result<Effective, String> {
        let mut d = capget()?;
        let saved = [d[0].effective, d[1].effective];
        for &c in caps {
            d[(c / 32) as usize].effective &= !(1 << (c % 32));
        }
        capset(&d)?;
        Ok(Effective { saved })
    }
}

impl Drop for Effective {
    fn drop(&mut self) {
        if let Ok(mut d) = capget() {
            d[0].effective = self.saved[0];
            d[1].effective = self.saved[1];
            let _ = capset(&d);
        }
    }
}
