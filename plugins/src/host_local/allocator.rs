//! host-local's allocation logic over any `Store` (the reference's `IPAllocator`): one address
//! per range set, round-robin from the last reservation, requested addresses, all-or-nothing
//! ADD with rollback, release by attachment, GC and the STATUS fullness check.
//!
//! Unlike the reference, which locks once per range set, the whole ADD (every range set and
//! its rollback) runs under one lock: another plugin never sees half an allocation.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use twill_common::cni::{code, Attachment, CniError};

use super::config::{describe_set, set_contains, Range, RangeSet};
use super::store::{LockedStore, Reservation, Store};
use crate::ipnet::{from_u128, to_u128};

/// One allocated address with its prefix, and the gateway of its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
}

/// Allocates from `sets` (range set `i` keeps its round-robin position as `i` in the store).
pub struct Allocator<S> {
    store: S,
    sets: Vec<RangeSet>,
}

impl<S: Store> Allocator<S> {
    pub fn new(store: S, sets: Vec<RangeSet>) -> Allocator<S> {
        Allocator { store, sets }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// ADD: one address per range set, each set taking the first `requested` address inside
    /// it, else the next free one in round-robin order. All or nothing: on any failure the
    /// addresses this call reserved (and only those) are released again.
    pub fn allocate(
        &self,
        id: &str,
        ifname: &str,
        requested: &[IpAddr],
    ) -> Result<Vec<Allocation>, CniError> {
        let mut store = self.store.lock()?;
        let mut got = Vec::new();
        let result = self.allocate_locked(&mut store, id, ifname, requested, &mut got);
        if result.is_err() {
            for a in &got {
                // The allocation error is what the caller must see; a release that fails
                // here leaves a file DEL or GC removes later.
                let _ = store.release_ip(a.address.ip());
            }
            got.clear();
        }
        result.map(|()| got)
    }

    fn allocate_locked<L: LockedStore>(
        &self,
        store: &mut L,
        id: &str,
        ifname: &str,
        requested: &[IpAddr],
        got: &mut Vec<Allocation>,
    ) -> Result<(), CniError> {
        let mine = store.find(id, ifname)?;
        let mut requested = requested.to_vec();
        for (idx, set) in self.sets.iter().enumerate() {
            if let Some(r) = mine.iter().find(|r| set_contains(set, r.ip)) {
                return Err(CniError::internal(format!(
                    "{} has been allocated to {id}, duplicate allocation is not allowed",
                    r.ip
                )));
            }
            let want = requested
                .iter()
                .position(|ip| set_contains(set, *ip))
                .map(|i| requested.remove(i));
            got.push(get(store, idx, set, id, ifname, want)?);
        }
        if !requested.is_empty() {
            let list: Vec<String> = requested.iter().map(ToString::to_string).collect();
            return Err(CniError::internal(format!(
                "failed to allocate all requested IPs: {}",
                list.join(", ")
            )));
        }
        Ok(())
    }

    /// DEL: releases every reservation of `(id, ifname)` (legacy id-only ones when there is
    /// no exact match); how many. Releasing again finds none.
    pub fn release(&self, id: &str, ifname: &str) -> Result<usize, CniError> {
        self.store.lock()?.release_by_id(id, ifname)
    }

    /// The reservations of `(id, ifname)` (for CHECK).
    pub fn reservations_of(&self, id: &str, ifname: &str) -> Result<Vec<Reservation>, CniError> {
        self.store.lock()?.find(id, ifname)
    }

    /// STATUS: code 50 when some range set has no free address left.
    pub fn status(&self) -> Result<(), CniError> {
        let taken = self.store.lock()?.list()?;
        check_free(&self.sets, &taken)
    }

    /// GC: releases every reservation whose attachment is not in `valid` (a legacy id-only
    /// reservation is kept by any attachment of its container); how many. Every release is
    /// tried, the failures are reported together.
    pub fn gc(&self, valid: &[Attachment]) -> Result<usize, CniError> {
        let mut store = self.store.lock()?;
        let mut released = 0;
        let mut errors = Vec::new();
        for r in store.list()? {
            let keep = valid.iter().any(|a| {
                a.container_id == r.container_id && (r.ifname.is_empty() || a.ifname == r.ifname)
            });
            if !keep {
                match store.release_ip(r.ip) {
                    Ok(()) => released += 1,
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        if errors.is_empty() {
            Ok(released)
        } else {
            Err(CniError::internal(format!("gc: {}", errors.join("; "))))
        }
    }
}

/// One address from range set `idx` for `(id, ifname)` under the caller's lock (the
/// reference's `Get`): `requested` if it is free and not the gateway, else round-robin.
fn get<L: LockedStore>(
    store: &mut L,
    idx: usize,
    set: &RangeSet,
    id: &str,
    ifname: &str,
    requested: Option<IpAddr>,
) -> Result<Allocation, CniError> {
    if let Some(ip) = requested {
        let range = set.iter().find(|r| r.contains(ip)).ok_or_else(|| {
            CniError::internal(format!(
                "requested IP address {ip} is not in range set {}",
                describe_set(set)
            ))
        })?;
        if range.gateway == Some(ip) {
            return Err(CniError::internal(format!(
                "requested ip {ip} is subnet's gateway"
            )));
        }
        let a = allocation(ip, range)?;
        if !store.reserve(ip, id, ifname, idx)? {
            return Err(CniError::internal(format!(
                "requested IP address {ip} is not available in range set {}",
                describe_set(set)
            )));
        }
        return Ok(a);
    }
    let last = store.last_reserved(idx);
    for (ip, range) in round_robin(set, last) {
        if range.gateway == Some(ip) {
            continue;
        }
        let a = allocation(ip, range)?;
        if store.reserve(ip, id, ifname, idx)? {
            return Ok(a);
        }
    }
    Err(exhausted(idx, set))
}

fn allocation(ip: IpAddr, range: &Range) -> Result<Allocation, CniError> {
    let address = IpNetwork::new(ip, range.subnet.prefix())
        .map_err(|e| CniError::internal(format!("{ip}/{}: {e}", range.subnet.prefix())))?;
    Ok(Allocation {
        address,
        gateway: range.gateway,
    })
}

/// The candidates of a range set in round-robin order (the reference's `RangeIter`): after
/// `last` if it is inside the set, else from the first range's start; every address once,
/// `last` itself at the very end, with its range. A crash-looping pod thus does not get its
/// previous address back until the whole set has been gone through.
fn round_robin(
    set: &RangeSet,
    last: Option<IpAddr>,
) -> impl Iterator<Item = (IpAddr, &Range)> + '_ {
    let (start_range, start_at) =
        match last.and_then(|l| set.iter().position(|r| r.contains(l)).map(|i| (i, l))) {
            Some((i, l)) => (i, Some(to_u128(l))),
            None => (0, None),
        };
    // Walk ranges from start_range, wrapping; the first range begins after `last`,
    // and the same range is revisited at the end for the addresses up to `last`.
    let n = set.len();
    (0..=n).flat_map(move |k| {
        let r = &set[(start_range + k) % n];
        let v4 = r.start.is_ipv4();
        let (lo, hi) = (to_u128(r.start), to_u128(r.end));
        // (1, 0) is an empty span.
        let (from, to) = match (k, start_at) {
            (0, Some(l)) => l.checked_add(1).map_or((1, 0), |f| (f, hi)),
            (k, Some(l)) if k == n => (lo, l),
            (k, None) if k == n => (1, 0),
            _ => (lo, hi),
        };
        (from..=to).map(move |x| (from_u128(x, v4), r))
    })
}

fn exhausted(idx: usize, set: &RangeSet) -> CniError {
    CniError::new(
        code::POOL_EXHAUSTED,
        format!(
            "failed to allocate for range {idx}: no IP addresses available in range set: {}",
            describe_set(set)
        ),
    )
}

/// STATUS over the reservations `taken`: code 50 naming the first range set with no free
/// address (gateways are neither free nor counted as taken).
pub fn check_free(sets: &[RangeSet], taken: &[Reservation]) -> Result<(), CniError> {
    for (idx, set) in sets.iter().enumerate() {
        let size: u128 = set.iter().map(|r| r.size()).sum();
        let used = taken
            .iter()
            .filter(|t| {
                set.iter()
                    .any(|r| r.contains(t.ip) && r.gateway != Some(t.ip))
            })
            .count() as u128;
        if used >= size {
            return Err(
                CniError::new(code::NOT_AVAILABLE, "no IP addresses available")
                    .with_details(format!("range set {idx} ({}) is full", describe_set(set))),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
