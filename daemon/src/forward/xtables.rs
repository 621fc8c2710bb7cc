//! `filter FORWARD` of an iptables backend (`iptables-save` listing → commands), pure.
//!
//! As flannel's `FLANNEL-FWD`: a chain `TWILL-FWD` accepting from and to the pod network,
//! jumped from the top of `FORWARD`, present only while `FORWARD` drops.

use ipnetwork::Ipv4Network;

use super::{canonical, COMMENT};
use crate::iptables::{Chain, Filter};

/// twill's chain in the `filter` table.
pub const CHAIN: &str = "TWILL-FWD";

/// Owned argv words.
fn s(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// The rules of [`CHAIN`], as arguments after `-A TWILL-FWD` (the form `iptables-save`
/// prints them in, so they compare equal to a parsed listing).
pub fn chain_rules(network: Ipv4Network) -> Vec<Vec<String>> {
    let net = canonical(network).to_string();
    ["-s", "-d"]
        .iter()
        .map(|dir| {
            s(&[
                dir,
                &net,
                "-m",
                "comment",
                "--comment",
                COMMENT,
                "-j",
                "ACCEPT",
            ])
        })
        .collect()
}

/// The jump from `FORWARD` into [`CHAIN`], as arguments after `-A FORWARD`.
pub fn jump_rule() -> Vec<String> {
    s(&["-m", "comment", "--comment", COMMENT, "-j", CHAIN])
}

fn target(rule: &[String]) -> Option<&str> {
    let i = rule.iter().position(|w| w == "-j" || w == "--jump")?;
    rule.get(i + 1).map(String::as_str)
}

/// Whether `FORWARD` drops what no earlier rule accepts: policy DROP (Docker), or an
/// unconditional `-j DROP`/`-j REJECT` rule (e.g. RHEL's iptables-services default).
pub fn drops_forwarded(filter: &Filter) -> bool {
    let Some(fwd) = filter.chain("FORWARD") else {
        return false;
    };
    fwd.policy.as_deref() == Some("DROP")
        || fwd.rules.iter().any(|r| {
            matches!(r.first().map(String::as_str), Some("-j" | "--jump"))
                && matches!(target(r), Some("DROP" | "REJECT"))
        })
}

/// What one backend needs, as argument lists for `iptables -t filter`, in order.
/// `filter` is `None` when the backend has no filter table (then nothing can drop there and
/// nothing of twill's can be there).
pub fn plan(filter: Option<&Filter>, network: Ipv4Network) -> Vec<Vec<String>> {
    let Some(filter) = filter else {
        return Vec::new();
    };
    let ours = filter.chain(CHAIN);
    let jumps: Vec<&Vec<String>> = filter
        .chain("FORWARD")
        .map(|c| {
            c.rules
                .iter()
                .filter(|r| target(r) == Some(CHAIN))
                .collect()
        })
        .unwrap_or_default();
    let mut cmds = Vec::new();
    if drops_forwarded(filter) {
        let want = chain_rules(network);
        let fill = match ours {
            Some(Chain { rules, .. }) if *rules == want => false,
            // Flushed, edited, or still for an old network: rewrite it.
            Some(_) => {
                cmds.push(s(&["-F", CHAIN]));
                true
            }
            None => {
                cmds.push(s(&["-N", CHAIN]));
                true
            }
        };
        if fill {
            for r in want {
                cmds.push([s(&["-A", CHAIN]), r].concat());
            }
        }
        // Present anywhere in FORWARD is enough (as kube-proxy's EnsureRule): moving it back
        // to the top on every pass would fight whoever inserted above it.
        if jumps.is_empty() {
            cmds.push([s(&["-I", "FORWARD", "1"]), jump_rule()].concat());
        }
    } else if ours.is_some() || !jumps.is_empty() {
        for j in jumps {
            cmds.push([s(&["-D", "FORWARD"]), j.clone()].concat());
        }
        if ours.is_some() {
            cmds.push(s(&["-F", CHAIN]));
            cmds.push(s(&["-X", CHAIN]));
        }
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: &str = "10.5.0.0/16";

    fn net() -> Ipv4Network {
        NET.parse().unwrap()
    }

    fn save(policy: &str, forward: &[&str], twill: Option<&[&str]>) -> Filter {
        let mut t = format!(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD {policy} [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        );
        if twill.is_some() {
            t.push_str(":TWILL-FWD - [0:0]\n");
        }
        for r in forward {
            t.push_str(&format!("-A FORWARD {r}\n"));
        }
        for r in twill.unwrap_or_default() {
            t.push_str(&format!("-A TWILL-FWD {r}\n"));
        }
        t.push_str("COMMIT\n");
        Filter::parse(&t).unwrap()
    }

    const JUMP: &str = r#"-m comment --comment "twill forward" -j TWILL-FWD"#;
    const SRC: &str = r#"-s 10.5.0.0/16 -m comment --comment "twill forward" -j ACCEPT"#;
    const DST: &str = r#"-d 10.5.0.0/16 -m comment --comment "twill forward" -j ACCEPT"#;

    fn cmd(line: &str) -> Vec<String> {
        line.split('|').map(str::to_string).collect()
    }

    fn install_all() -> Vec<Vec<String>> {
        vec![
            cmd("-N|TWILL-FWD"),
            cmd("-A|TWILL-FWD|-s|10.5.0.0/16|-m|comment|--comment|twill forward|-j|ACCEPT"),
            cmd("-A|TWILL-FWD|-d|10.5.0.0/16|-m|comment|--comment|twill forward|-j|ACCEPT"),
            cmd("-I|FORWARD|1|-m|comment|--comment|twill forward|-j|TWILL-FWD"),
        ]
    }

    #[test]
    fn policy_drop_installs_chain_and_jump_at_the_top() {
        let f = save("DROP", &["-j DOCKER-USER"], None);
        assert_eq!(plan(Some(&f), net()), install_all());
    }

    #[test]
    fn installed_state_needs_nothing() {
        let f = save("DROP", &[JUMP, "-j DOCKER-USER"], Some(&[SRC, DST]));
        assert!(plan(Some(&f), net()).is_empty());
        // A jump that something else pushed down is left where it is.
        let f = save("DROP", &["-j DOCKER-USER", JUMP], Some(&[SRC, DST]));
        assert!(plan(Some(&f), net()).is_empty());
    }

    #[test]
    fn flushed_chain_is_refilled_without_a_second_jump() {
        let f = save("DROP", &[JUMP], Some(&[]));
        let want = install_all()[1..3].to_vec();
        assert_eq!(
            plan(Some(&f), net()),
            [vec![cmd("-F|TWILL-FWD")], want].concat()
        );
    }

    #[test]
    fn deleted_jump_is_inserted_again() {
        let f = save("DROP", &["-j DOCKER-USER"], Some(&[SRC, DST]));
        assert_eq!(plan(Some(&f), net()), install_all()[3..].to_vec());
    }

    #[test]
    fn chain_for_another_network_or_edited_is_rewritten() {
        let old = r#"-s 10.9.0.0/16 -m comment --comment "twill forward" -j ACCEPT"#;
        let f = save("DROP", &[JUMP], Some(&[old, DST]));
        let p = plan(Some(&f), net());
        assert_eq!(p[0], cmd("-F|TWILL-FWD"));
        assert_eq!(p[1..], install_all()[1..3]);
        // An extra rule someone added to twill's chain goes as well.
        let f = save("DROP", &[JUMP], Some(&[SRC, DST, "-j DROP"]));
        assert_eq!(plan(Some(&f), net())[0], cmd("-F|TWILL-FWD"));
    }

    #[test]
    fn network_with_host_bits_compares_canonically() {
        let f = save("DROP", &[JUMP], Some(&[SRC, DST]));
        assert!(plan(Some(&f), "10.5.7.1/16".parse().unwrap()).is_empty());
    }

    #[test]
    fn unconditional_reject_rule_counts_as_drop() {
        let f = save(
            "ACCEPT",
            &["-j REJECT --reject-with icmp-host-prohibited"],
            None,
        );
        assert!(drops_forwarded(&f));
        assert_eq!(plan(Some(&f), net()), install_all());
        // A conditional drop does not stop pod traffic in general.
        let f = save("ACCEPT", &["-i eth9 -j DROP"], None);
        assert!(!drops_forwarded(&f));
        assert!(plan(Some(&f), net()).is_empty());
    }

    #[test]
    fn nothing_dropping_installs_nothing() {
        assert!(plan(None, net()).is_empty());
        let f = save("ACCEPT", &["-j DOCKER-USER", "-o docker0 -j ACCEPT"], None);
        assert!(plan(Some(&f), net()).is_empty());
        // A filter table without FORWARD (a legacy table of someone else's chains).
        let f = Filter::parse("*filter\n:X - [0:0]\n-A X -j DROP\nCOMMIT\n").unwrap();
        assert!(plan(Some(&f), net()).is_empty());
    }

    #[test]
    fn policy_back_to_accept_removes_only_twills_rules() {
        let f = save(
            "ACCEPT",
            &["-j DOCKER-USER", JUMP, "-o docker0 -j ACCEPT"],
            Some(&[SRC, DST]),
        );
        assert_eq!(
            plan(Some(&f), net()),
            [
                cmd("-D|FORWARD|-m|comment|--comment|twill forward|-j|TWILL-FWD"),
                cmd("-F|TWILL-FWD"),
                cmd("-X|TWILL-FWD"),
            ]
        );
        // Every jump into twill's chain must go before the chain can be deleted.
        let f = save("ACCEPT", &[JUMP, "-i eth0 -j TWILL-FWD"], None);
        assert_eq!(
            plan(Some(&f), net()),
            [
                cmd("-D|FORWARD|-m|comment|--comment|twill forward|-j|TWILL-FWD"),
                cmd("-D|FORWARD|-i|eth0|-j|TWILL-FWD"),
            ]
        );
    }
}
