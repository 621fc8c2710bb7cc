//! The seam between host-local's allocator and where reservations live (the reference's
//! `backend.Store`). A `Store` only hands out its operations through `lock()`: the guard holds
//! the store's exclusive lock until it is dropped, so one ADD, DEL or GC runs under a single
//! lock and concurrent plugins on a node serialize on it (for the file store that is the same
//! `flock` the reference host-local takes, so mixing both plugins on one store stays safe).

use std::net::IpAddr;

use twill_common::cni::CniError;

/// One reservation: an address held by a container's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: IpAddr,
    pub container_id: String,
    /// Empty for legacy id-only reservations (written by host-local before ifnames were kept).
    pub ifname: String,
}

/// Where reservations live.
pub trait Store {
    type Guard<'a>: LockedStore
    where
        Self: 'a;

    /// Takes the exclusive lock (blocking until it is free); released when the guard drops.
    fn lock(&self) -> Result<Self::Guard<'_>, CniError>;
}

/// What may be done with a store while holding its lock.
pub trait LockedStore {
    /// Reserves `ip` for `(id, ifname)` and records it as range set `set_idx`'s last
    /// reservation; `false` when the address is already taken.
    fn reserve(
        &mut self,
        ip: IpAddr,
        id: &str,
        ifname: &str,
        set_idx: usize,
    ) -> Result<bool, CniError>;

    /// The last address reserved from range set `set_idx`, if one is recorded and readable
    /// (losing it only costs round-robin its starting point, as in the reference).
    fn last_reserved(&self, set_idx: usize) -> Option<IpAddr>;

    /// Every reservation, ordered by address.
    fn list(&self) -> Result<Vec<Reservation>, CniError>;

    /// Releases one address; releasing a free address is fine.
    fn release_ip(&mut self, ip: IpAddr) -> Result<(), CniError>;

    /// The reservations of `(id, ifname)`; when there are none, the legacy id-only ones of
    /// `id` (the reference's fallback, so attachments made by old versions are still found).
    fn find(&self, id: &str, ifname: &str) -> Result<Vec<Reservation>, CniError> {
        let all = self.list()?;
        let id = id.trim();
        let exact: Vec<Reservation> = all
            .iter()
            .filter(|r| r.container_id == id && r.ifname == ifname)
            .cloned()
            .collect();
        if !exact.is_empty() {
            return Ok(exact);
        }
        Ok(all
            .into_iter()
            .filter(|r| r.container_id == id && r.ifname.is_empty())
            .collect())
    }

    /// Releases every reservation `find` returns; how many there were.
    fn release_by_id(&mut self, id: &str, ifname: &str) -> Result<usize, CniError> {
        let found = self.find(id, ifname)?;
        for r in &found {
            self.release_ip(r.ip)?;
        }
        Ok(found.len())
    }
}

/// A shared store is a store: several allocators (or threads) over one store serialize on
/// its lock.
impl<S: Store + ?Sized> Store for &S {
    type Guard<'a>
        = S::Guard<'a>
    where
        Self: 'a;

    fn lock(&self) -> Result<Self::Guard<'_>, CniError> {
        (**self).lock()
    }
}
