//! numapind's wire protocol, version [`VERSION`] (`docs/protocol.md`).
//!
//! One JSON object per `SOCK_SEQPACKET` message, at most [`MAX_REQUEST`]
//! bytes from a client and [`MAX_REPLY`] bytes from the daemon. A client
//! sends a [`Request`] and waits for the `Message::Reply` with the same `id`
//! before sending the next (one request in flight per connection); the
//! daemon may also send an [`Event`] at any time. The reply to `allocate`
//! carries the region's memfd as `SCM_RIGHTS`; no other message carries an
//! fd, and the daemon closes any fd a client sends.

use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// The longest message a client may send, in bytes.
pub const MAX_REQUEST: usize = 4096;
/// The longest message the daemon sends, in bytes.
pub const MAX_REPLY: usize = 64 * 1024;
/// The most regions a `status` or `inspect` reply lists (the totals count
/// every region).
pub const MAX_LISTED: usize = 200;
/// The most physical extents one reply carries (`allocate`'s `phys`, each
/// region of `inspect`): about 40 KiB of JSON.
pub const MAX_EXTENTS: usize = 1024;

/// A request: its id (echoed in the reply) and what to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client; echoed in the reply.
    pub id: u64,
    /// The operation and its arguments.
    #[serde(flatten)]
    pub op: Op,
}

/// The operations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// The first request on a connection: the versions must match.
    Hello {
        /// The client's protocol version.
        version: u32,
    },
    /// Allocate, pin and share a region.
    Allocate(Allocate),
    /// Unmap and free one of this connection's regions.
    Release {
        /// The region id from `allocate`.
        region: u64,
    },
    /// Re-check one of this connection's regions (nodes and PFNs).
    Verify {
        /// The region id from `allocate`.
        region: u64,
    },
    /// Regions, bytes per node and user, DMA mappings left.
    Status,
    /// Root only: regions with the daemon's mapping and PFN snapshot (for
    /// tests that compare frames), [`MAX_EXTENTS`] extents at a time.
    Inspect {
        /// Only this owner's regions.
        #[serde(default)]
        pid: Option<i32>,
        /// The first extent to list.
        #[serde(default)]
        from: u64,
    },
    /// Root, or a user the config lists in `selftest_users`: the device
    /// (QEMU's edu) writes a pattern into one of this connection's regions
    /// by DMA through its IOVA. A test aid, never needed to use a region.
    SelftestDma {
        /// The region id from `allocate`.
        region: u64,
        /// Byte offset in the region.
        offset: u64,
        /// Bytes to write (1..=2048, the edu device's buffer).
        len: u64,
        /// Pattern seed ([`pattern`]).
        seed: u8,
    },
}

impl Op {
    /// The operation's name on the wire (`allocate`, `release`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello { .. } => "hello",
            Op::Allocate(_) => "allocate",
            Op::Release { .. } => "release",
            Op::Verify { .. } => "verify",
            Op::Status => "status",
            Op::Inspect { .. } => "inspect",
            Op::SelftestDma { .. } => "selftest-dma",
        }
    }
}

/// What to allocate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocate {
    /// The device to pin through (PCI address as the daemon was given it);
    /// `None`: the daemon's first device.
    #[serde(default)]
    pub device: Option<String>,
    /// NUMA node.
    pub node: u32,
    /// Bytes; a non-zero multiple of the page size.
    pub size: u64,
    /// Page size in bytes: 4096, 2097152 or 1073741824.
    pub page_size: u64,
    /// A fixed IOVA, or `None` for one the daemon picks.
    #[serde(default)]
    pub iova: Option<u64>,
    /// The shortest physically contiguous extent accepted.
    #[serde(default)]
    pub min_extent: Option<u64>,
    /// Send the region's physical extents with the reply. Only users the
    /// config lists in `phys_users` get them; a no-IOMMU device's reply
    /// has them whether asked or not (they are its DMA addresses).
    #[serde(default)]
    pub phys: bool,
    /// Send the memfd as soon as the memory is placed, in a
    /// [`Outcome::Placed`] reply before the final one, so that the client
    /// maps it while the daemon pins and proves the region. The final
    /// reply still carries the memfd. Absent (false) for clients that
    /// expect one reply.
    #[serde(default)]
    pub early_memfd: bool,
}

/// A message from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    /// The answer to request `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// What it produced.
        result: Outcome,
    },
    /// Something the daemon tells every client unasked.
    Event(Event),
}

/// A reply's content: the operation's result, or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// `hello`.
    Hello(Hello),
    /// `allocate` (the memfd comes with the message).
    Allocated(Allocated),
    /// `allocate` with `early_memfd`: the region's memory is allocated and
    /// placed, its memfd comes with this message, the pin is being taken.
    /// The final reply (with the same id) follows: `allocated`, or an error
    /// after which the memfd holds nothing (the daemon punched it).
    Placed {
        /// Bytes (the memfd's size).
        len: u64,
        /// Page size in bytes.
        page_size: u64,
    },
    /// `release`.
    Released {
        /// The region released.
        region: u64,
    },
    /// `verify`.
    Verified(Verified),
    /// `status`.
    Status(Status),
    /// `inspect`.
    Inspect(Vec<Inspected>),
    /// `selftest-dma`.
    DmaDone {
        /// Bytes the device wrote.
        bytes: u64,
    },
    /// The request failed; nothing was left behind.
    Error(ErrorBody),
}

/// An error: the class ([`ErrorKind::name`]), what happened, what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The class, as in `docs/errors.md`.
    pub kind: ErrorKind,
    /// What happened.
    pub message: String,
    /// What to do.
    pub hint: Option<String>,
}

/// Unasked messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The daemon is stopping: every region of this connection is being
    /// released, and the connection closes next.
    Shutdown {
        /// Why (e.g. `SIGTERM`).
        reason: String,
    },
    /// A message that could not be answered as a reply (it did not parse
    /// far enough to have an id, or was refused before decoding).
    Refused(ErrorBody),
}

/// The reply to `hello`: the daemon and what this client may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The daemon's protocol version.
    pub version: u32,
    /// numapind's crate version.
    pub daemon: String,
    /// [`MAX_REQUEST`] as the daemon has it.
    pub max_request: usize,
    /// [`MAX_REPLY`] as the daemon has it.
    pub max_reply: usize,
    /// The devices, the default first.
    pub devices: Vec<Device>,
    /// The peer as the kernel reported it (`SO_PEERCRED`).
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Peer pid.
    pub pid: i32,
    /// `"pidfd"` when the daemon holds a pidfd of the peer
    /// (`SO_PEERPIDFD`, Linux 6.5), `"pid"` otherwise.
    pub peer_identity: String,
    /// Whether replies to this user carry physical addresses.
    pub phys: bool,
    /// This user's quota.
    pub quota: Quota,
}

/// A device the daemon serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// As given with `--device`.
    pub name: String,
    /// `type1-iommu`, `mdev-only` or `no-iommu`.
    pub kind: String,
}

/// Limits per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Bytes on each node.
    pub bytes_per_node: u64,
    /// Regions at once.
    pub regions: u64,
}

/// A physically contiguous run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Physical address.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
}

/// The reply to `allocate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocated {
    /// The region's id on this connection.
    pub region: u64,
    /// The device it is pinned through.
    pub device: String,
    /// The IOVA of byte 0 (`None` for a no-IOMMU device).
    pub iova: Option<u64>,
    /// Physical extents, only when asked for (or for a no-IOMMU device),
    /// only for users the config allows to see them, and only up to
    /// [`MAX_EXTENTS`] (`phys_extents` counts them all).
    pub phys: Option<Vec<Extent>>,
    /// How many physical extents the region has (for those users).
    #[serde(default)]
    pub phys_extents: Option<u64>,
    /// Bytes (the memfd's size).
    pub len: u64,
    /// The node.
    pub node: u32,
    /// Page size in bytes.
    pub page_size: u64,
    /// What holds the pin (`vfio-map-dma`, `io_uring`).
    pub pin: String,
}

/// The reply to `verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// The region.
    pub region: u64,
    /// Pages checked.
    pub pages: u64,
    /// Pages off the region's node.
    pub off_node: u64,
    /// Base pages whose frame changed since the pin.
    pub pfn_changed: Option<u64>,
    /// Nothing moved.
    pub intact: bool,
}

/// One region in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionStatus {
    /// Its id on its connection.
    pub region: u64,
    /// The owner.
    pub uid: u32,
    /// The owner's pid.
    pub pid: i32,
    /// The device.
    pub device: String,
    /// Node.
    pub node: u32,
    /// Bytes.
    pub len: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// IOVA.
    pub iova: Option<u64>,
}

/// Bytes one user holds on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The user.
    pub uid: u32,
    /// The node.
    pub node: u32,
    /// Bytes.
    pub bytes: u64,
    /// Regions.
    pub regions: u64,
}

/// DMA mappings a device has left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The device.
    pub name: String,
    /// `VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL` now (`None`: not reported).
    pub dma_avail: Option<u32>,
}

/// The reply to `status`. Root sees every region and user; anyone else
/// sees their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Regions (at most [`MAX_LISTED`]).
    pub regions: Vec<RegionStatus>,
    /// Regions in all (as visible to the caller).
    pub total_regions: u64,
    /// Bytes per user and node.
    pub usage: Vec<Usage>,
    /// Per device.
    pub devices: Vec<DeviceStatus>,
    /// Connections open now.
    pub connections: u64,
    /// The daemon's pid.
    pub pid: u32,
}

/// One region in `inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspected {
    /// The owner's pid and region id.
    pub pid: i32,
    /// The region id on that connection.
    pub region: u64,
    /// The daemon's own mapping of the memfd.
    pub daemon_vaddr: u64,
    /// Bytes.
    pub len: u64,
    /// The frames pinned, from the snapshot taken at pin time: extents
    /// `from..from + MAX_EXTENTS` of them.
    pub pfns: Option<Vec<Extent>>,
    /// Extents in the whole snapshot.
    pub total_extents: u64,
}

/// Byte `i` of the `selftest-dma` pattern with `seed`.
pub fn pattern(seed: u8, i: u64) -> u8 {
    (i as u8).wrapping_mul(29).wrapping_add(seed) ^ 0xa5
}

/// Decodes one client message. Never panics; any failure is a usage error.
pub fn decode_request(bytes: &[u8]) -> Result<Request, ErrorBody> {
    if bytes.len() > MAX_REQUEST {
        return Err(ErrorBody {
            kind: ErrorKind::Usage,
            message: format!(
                "a request of {} bytes is over the {MAX_REQUEST}-byte limit",
                bytes.len()
            ),
            hint: Some("send one request per message, as docs/protocol.md describes".into()),
        });
    }
    serde_json::from_slice(bytes).map_err(|e| ErrorBody {
        kind: ErrorKind::Usage,
        message: format!("the request is not valid protocol-{VERSION} JSON: {e}"),
        hint: Some("see docs/protocol.md for the request forms".into()),
    })
}

/// Decodes one daemon message.
pub fn decode_message(bytes: &[u8]) -> Result<Message, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// Encodes a message.
pub fn encode<T: Serialize>(m: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(m).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request {
                id: 1,
                op: Op::Hello { version: VERSION },
            },
            Request {
                id: 2,
                op: Op::Allocate(Allocate {
                    device: Some("0000:00:03.0".into()),
                    node: 1,
                    size: 64 << 20,
                    page_size: 2 << 20,
                    iova: Some(1 << 32),
                    min_extent: None,
                    phys: true,
                    early_memfd: true,
                }),
            },
            Request {
                id: 3,
                op: Op::Release { region: 7 },
            },
            Request {
                id: 4,
                op: Op::Status,
            },
            Request {
                id: 6,
                op: Op::Verify { region: 2 },
            },
            Request {
                id: 7,
                op: Op::Inspect {
                    pid: Some(42),
                    from: 1024,
                },
            },
            Request {
                id: 5,
                op: Op::SelftestDma {
                    region: 1,
                    offset: 0,
                    len: 2048,
                    seed: 3,
                },
            },
        ];
        for r in reqs {
            let bytes = encode(&r);
            assert_eq!(decode_request(&bytes).unwrap(), r);
            // The name the daemon logs is the wire's tag.
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["op"], r.op.name());
        }
    }

    #[test]
    fn the_wire_form_is_the_documented_one() {
        let r =
            decode_request(br#"{"id":9,"op":"allocate","node":1,"size":4096,"page_size":4096}"#)
                .unwrap();
        assert_eq!(r.id, 9);
        assert!(matches!(
            r.op,
            Op::Allocate(Allocate {
                node: 1,
                size: 4096,
                device: None,
                phys: false,
                early_memfd: false,
                ..
            })
        ));
        // The early reply an early_memfd allocate gets before the final one.
        let placed = Message::Reply {
            id: 9,
            result: Outcome::Placed {
                len: 4096,
                page_size: 4096,
            },
        };
        let text = String::from_utf8(encode(&placed)).unwrap();
        assert_eq!(
            text,
            r#"{"type":"reply","id":9,"result":{"placed":{"len":4096,"page_size":4096}}}"#
        );
        assert_eq!(decode_message(text.as_bytes()).unwrap(), placed);
        let m = Message::Reply {
            id: 9,
            result: Outcome::Error(ErrorBody {
                kind: ErrorKind::ResourceLimit,
                message: "m".into(),
                hint: None,
            }),
        };
        let text = String::from_utf8(encode(&m)).unwrap();
        assert_eq!(
            text,
            r#"{"type":"reply","id":9,"result":{"error":{"kind":"resource-limit","message":"m","hint":null}}}"#
        );
        assert_eq!(decode_message(text.as_bytes()).unwrap(), m);
    }

    #[test]
    fn bad_requests_are_usage_errors() {
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"{\"id\":1}",
            b"{\"id\":1,\"op\":\"format-disk\"}",
            b"{\"id\":-1,\"op\":\"status\"}",
            b"{\"id\":1,\"op\":\"allocate\",\"node\":1}",
            b"{\"id\":1,\"op\":\"release\",\"region\":18446744073709551616}",
        ] {
            let e = decode_request(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Usage, "{bad:?}");
        }
        let big = vec![b' '; MAX_REQUEST + 1];
        assert!(decode_request(&big).unwrap_err().message.contains("limit"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
            match decode_request(&bytes) {
                Ok(r) => {
                    // Whatever decoded re-encodes and decodes to itself.
                    prop_assert_eq!(decode_request(&encode(&r)).unwrap(), r);
                }
                Err(e) => prop_assert_eq!(e.kind, ErrorKind::Usage),
            }
        }

        #[test]
        fn mutated_valid_requests_never_panic(
            cut in 0usize..120,
            flip in 0usize..120,
            byte in any::<u8>(),
        ) {
            let mut b = br#"{"id":5,"op":"allocate","device":"0000:00:03.0","node":1,"size":67108864,"page_size":4096}"#.to_vec();
            let f = flip % b.len();
            b[f] = byte;
            b.truncate(cut.min(b.len()));
            let _ = decode_request(&b);
        }

        #[test]
        fn daemon_messages_never_panic_the_client(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = decode_message(&bytes);
        }
    }
}
