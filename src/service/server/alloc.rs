//! Allocation (the quota, the floor, the pin) and the root-only DMA
//! self-test of a connection.

use super::conn::*;
use super::*;

impl Conn<'_> {
    pub(super) fn allocate(
        &mut self,
        a: &Allocate,
    ) -> Result<(proto::Allocated, OwnedFd), ErrorBody> {
        let checks_started = std::time::Instant::now();
        let dev = self.device(a.device.as_deref())?;
        let (dev_name, pinner) = &self.shared.devices[dev];
        let page_size = PageSize::ALL
            .into_iter()
            .find(|p| p.bytes() == a.page_size)
            .ok_or_else(|| {
                error(
                    ErrorKind::Usage,
                    format!(
                        "page size {} is none of 4096, 2097152, 1073741824",
                        a.page_size
                    ),
                    "ask for 4K, 2M or 1G pages",
                )
            })?;
        let config = self.shared.config();
        let phys = config.phys(self.uid);
        let no_iommu = pinner.kind() == ContainerKind::NoIommu;
        // The extents go out when asked for, and always where they are
        // the DMA addresses.
        let send_phys = phys && (a.phys || no_iommu);
        if no_iommu && !phys {
            return Err(error(
                ErrorKind::Permission,
                format!(
                    "{dev_name} is a no-IOMMU device, whose DMA addresses are physical, and uid {} may not see physical addresses",
                    self.uid
                ),
                "ask the administrator to list the user in phys_users in numapind.toml",
            ));
        }
        let (node, size) = (a.node, a.size);
        let quota = config.quota(self.uid);
        let floor = config.floor(node);
        // Check and reserve under the lock, pin outside it.
        {
            let mut s = self.shared.state();
            let held = s.bytes.get(&(self.uid, node)).copied().unwrap_or(0);
            let count = s.regions.get(&self.uid).copied().unwrap_or(0);
            if count >= quota.regions {
                return Err(error(
                    ErrorKind::ResourceLimit,
                    format!("quota: uid {} holds {count} regions, its limit", self.uid),
                    "release a region, or ask the administrator to raise quota.regions in numapind.toml",
                ));
            }
            if held.saturating_add(size) > quota.bytes_per_node {
                return Err(error(
                    ErrorKind::ResourceLimit,
                    format!(
                        "quota: uid {} holds {} on node {node} and may hold {}; this region needs {} more",
                        self.uid,
                        numapin::addr::human_size(held),
                        numapin::addr::human_size(quota.bytes_per_node),
                        numapin::addr::human_size(size)
                    ),
                    "release regions, or ask the administrator to raise quota.bytes_per_node in numapind.toml",
                ));
            }
            // Hugetlb pages come from the reserved pool, not MemFree: the
            // floor guards base-page regions (the library checks the pool).
            if page_size == PageSize::Base {
                let free = node_free(node);
                let pending = s.pending.get(&node).copied().unwrap_or(0);
                if free.saturating_sub(pending).saturating_sub(size) < floor {
                    return Err(error(
                        ErrorKind::ResourceLimit,
                        format!(
                            "node {node} has {} free{}; pinning {} would take it below numapind's floor of {}",
                            numapin::addr::human_size(free),
                            if pending > 0 {
                                format!(
                                    " ({} of it being pinned now)",
                                    numapin::addr::human_size(pending)
                                )
                            } else {
                                String::new()
                            },
                            numapin::addr::human_size(size),
                            numapin::addr::human_size(floor)
                        ),
                        "use another node or a smaller region, or free memory on the node; the floor is floor in numapind.toml",
                    ));
                }
                *s.pending.entry(node).or_default() += size;
            }
            *s.bytes.entry((self.uid, node)).or_default() += size;
            *s.regions.entry(self.uid).or_default() += 1;
        }
        // With early_memfd the client gets the memfd once the memory is
        // placed and maps it while the pin and its proof run; a copy stays
        // here to punch the file if the pin then fails.
        let early: Mutex<Option<OwnedFd>> = Mutex::new(None);
        let (sock, id) = (self.sock.as_fd(), self.request);
        let send_early = |fd: BorrowedFd<'_>| {
            let Ok(kept) = fd.try_clone_to_owned() else {
                return;
            };
            let m = Message::Reply {
                id,
                result: Outcome::Placed {
                    len: size,
                    page_size: page_size.bytes(),
                },
            };
            // A failed send fails the final reply too, which ends the
            // connection and the region with it.
            let _ = wire::send(sock, &proto::encode(&m), &[fd]);
            *early.lock().unwrap_or_else(|p| p.into_inner()) = Some(kept);
        };
        let req = PinRequest {
            page_size,
            iova: a.iova.map(Iova),
            min_extent: a.min_extent,
            proof: Proof::Full,
            backing: Backing::Memfd,
            on_memfd: if a.early_memfd {
                Some(&send_early)
            } else {
                None
            },
            ..PinRequest::new(NodeId(node), size)
        };
        let started = std::time::Instant::now();
        let pinned = pinner.pin(&req);
        let pin_time = started.elapsed();
        let early = early.into_inner().unwrap_or_else(|p| p.into_inner());
        if let (Err(_), Some(f)) = (&pinned, &early) {
            if let Err(e) = numapin::memfd::discard(f.as_fd(), size) {
                log::error!(
                    "pid {}: punching the memfd of a failed allocation failed ({e}); the client may keep its pages",
                    self.pid
                );
            }
        }
        drop(early);
        let checked = checks_started.elapsed() - pin_time;
        // The snapshot's extents are built outside the state lock (a large
        // base-page region can have millions of runs); the lock only settles the
        // accounting and files the entry.
        let snapshot: Option<Vec<Extent>> = pinned.as_ref().ok().and_then(|r| {
            let base = numapin::addr::base_page_size();
            r.pinned_frames().map(|p| {
                p.extents(base)
                    .iter()
                    .map(|e| Extent {
                        addr: e.pa.raw(),
                        len: e.len,
                    })
                    .collect()
            })
        });
        let mut s = self.shared.state();
        if page_size == PageSize::Base {
            if let Some(p) = s.pending.get_mut(&node) {
                *p -= size;
            }
        }
        let region = match pinned {
            Ok(r) => r,
            Err(e) => {
                unaccount(&mut s, self.uid, node, size);
                return Err(from_lib(&e));
            }
        };
        let fd = match region.memfd().map(|f| f.try_clone_to_owned()) {
            Some(Ok(fd)) => fd,
            other => {
                unaccount(&mut s, self.uid, node, size);
                drop(s);
                drop(region);
                return Err(error(
                    ErrorKind::Internal,
                    format!("the region has no memfd to send ({other:?})"),
                    "report this",
                ));
            }
        };
        let id = self.next_region;
        self.next_region += 1;
        let info = proto::Allocated {
            region: id,
            device: dev_name.clone(),
            iova: region.iova().map(|i| i.raw()),
            phys: match &snapshot {
                Some(v) if send_phys && v.len() <= proto::MAX_EXTENTS => Some(v.clone()),
                _ => None,
            },
            phys_extents: snapshot
                .as_ref()
                .filter(|_| send_phys)
                .map(|v| v.len() as u64),
            len: region.len(),
            node,
            page_size: page_size.bytes(),
            pin: region.pin_kind().into(),
        };
        s.directory.insert(
            (self.id, id),
            Entry {
                uid: self.uid,
                pid: self.pid,
                device: dev_name.clone(),
                node,
                len: region.len(),
                page_size: page_size.bytes(),
                iova: info.iova,
                vaddr: region.vaddr().raw(),
                pfns: snapshot,
            },
        );
        drop(s);
        // Logged once the reply is out, so that the log costs the client
        // nothing.
        self.timing = Some(AllocTiming {
            region: id,
            size,
            node,
            checked,
            pinned: pin_time,
            ready: started.elapsed(),
        });
        self.regions.insert(id, Held { region, node, dev });
        Ok((info, fd))
    }

    pub(super) fn selftest(
        &self,
        region: u64,
        offset: u64,
        len: u64,
        seed: u8,
    ) -> Result<u64, ErrorBody> {
        if !self.shared.config().selftest(self.uid) {
            return Err(error(
                ErrorKind::Permission,
                format!(
                    "the DMA self-test is for root and selftest_users; uid {} is neither",
                    self.uid
                ),
                "list the user in selftest_users in numapind.toml (test machines only)",
            ));
        }
        let h = self
            .regions
            .get(&region)
            .ok_or_else(|| self.not_mine(region))?;
        if len == 0
            || len > 2048
            || offset
                .checked_add(len)
                .is_none_or(|end| end > h.region.len())
        {
            return Err(error(
                ErrorKind::Usage,
                format!(
                    "a self-test of {len} bytes at {offset:#x} does not fit 1..=2048 bytes (the edu buffer) inside the region"
                ),
                "pick a smaller transfer",
            ));
        }
        let dst = h
            .region
            .iova()
            .ok_or_else(|| {
                error(
                    ErrorKind::Usage,
                    "the region has no IOVA (no-IOMMU device)".into(),
                    "the self-test needs an IOMMU-backed device",
                )
            })?
            .raw()
            + offset;
        let pinner = &self.shared.devices[h.dev].1;
        let _one = self.shared.dma.lock().unwrap_or_else(|p| p.into_inner());
        let fd = pinner
            .device_fd()
            .ok_or_else(|| error(ErrorKind::DeviceState, "the device has no fd".into(), ""))?;
        let edu = numapin::edu::Edu::open(fd)
            .map_err(|e| from_lib(&e))?
            .with_dma_limit(1 << 40);
        // The source: a page of the daemon's own, pinned on the same node,
        // filled by the CPU; the device copies it to the client's region.
        let src = pinner
            .pin(&PinRequest::new(
                NodeId(h.node),
                numapin::addr::base_page_size(),
            ))
            .map_err(|e| from_lib(&e))?;
        for i in 0..len {
            // SAFETY: inside the daemon's own pinned page; volatile for the device.
            unsafe {
                std::ptr::write_volatile(src.as_ptr().add(i as usize), proto::pattern(seed, i))
            };
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let src_iova = src.iova().map(|i| i.raw()).unwrap_or(0);
        edu.dma_to_device(src_iova, len).map_err(|e| from_lib(&e))?;
        edu.dma_from_device(dst, len).map_err(|e| from_lib(&e))?;
        Ok(len)
    }
}
