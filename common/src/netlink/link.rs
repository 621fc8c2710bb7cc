//! Links by name or index, and the properties twill reads from them.

use futures::TryStreamExt;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::Handle;

use super::error::NlError;
use super::mac::Mac;

/// A link as a caller names it: netlink looks links up by either.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LinkId {
    Name(String),
    Index(u32),
}

impl From<&str> for LinkId {
    fn from(s: &str) -> LinkId {
        LinkId::Name(s.to_string())
    }
}

impl From<&String> for LinkId {
    fn from(s: &String) -> LinkId {
        LinkId::Name(s.clone())
    }
}

impl From<String> for LinkId {
    fn from(s: String) -> LinkId {
        LinkId::Name(s)
    }
}

impl From<u32> for LinkId {
    fn from(i: u32) -> LinkId {
        LinkId::Index(i)
    }
}

impl std::fmt::Display for LinkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkId::Name(n) => f.write_str(n),
            LinkId::Index(i) => write!(f, "ifindex {i}"),
        }
    }
}

/// The link `id`, or None when there is none. The one not-found rule for every caller: the
/// kernel answers ENODEV for a missing name or index (ENOENT on some paths).
pub async fn link_get(h: &Handle, id: impl Into<LinkId>) -> Result<Option<LinkMessage>, NlError> {
    let id = id.into();
    let req = h.link().get();
    let req = match &id {
        LinkId::Name(n) => req.match_name(n.clone()),
        LinkId::Index(i) => req.match_index(*i),
    };
    match req.execute().try_next().await {
        Ok(m) => Ok(m),
        Err(e) => {
            let e = NlError::kernel(format!("get link {id}"))(e);
            if e.is_not_found() {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// A link's properties the daemon cares about.
#[derive(Debug, Clone)]
pub struct LinkSummary {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<Mac>,
    pub kind: Option<InfoKind>,
    pub vxlan: Vec<InfoVxlan>,
}

impl LinkSummary {
    pub fn of(m: &LinkMessage) -> LinkSummary {
        let mut s = LinkSummary {
            index: m.header.index,
            name: String::new(),
            mtu: 0,
            mac: None,
            kind: None,
            vxlan: Vec::new(),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => s.name = n.clone(),
                LinkAttribute::Mtu(v) => s.mtu = *v,
                LinkAttribute::Address(b) => s.mac = Mac::from_bytes(b),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => s.kind = Some(k.clone()),
                            LinkInfo::Data(InfoData::Vxlan(v)) => s.vxlan = v.clone(),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        s
    }
}
