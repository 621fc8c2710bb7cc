//! The two iptables backends (`iptables-nft`, `iptables-legacy`): reading the `filter` table
//! as `iptables-save` prints it (parsed into [`Filter`], pure) and running typed commands
//! (argv only, never a shell).

use std::io::ErrorKind;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Which kernel API an iptables binary talks to. Both can hold a `filter` table at once, and
/// each one's FORWARD hook drops independently of the other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// iptables over nf_tables (`table ip filter`), the default on current distributions.
    Nft,
    /// The x_tables kernel API.
    Legacy,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Nft, Backend::Legacy];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft",
            Backend::Legacy => "iptables-legacy",
        }
    }

    fn save_bin(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-save",
            Backend::Legacy => "iptables-legacy-save",
        }
    }

    /// The `filter` table as `iptables-save -t filter` prints it; `None` when this backend has
    /// no filter table (nothing of it can drop forwarded packets).
    ///
    /// `iptables-legacy-save -t filter` would make the kernel instantiate the legacy filter
    /// table (hooks on every packet) if it does not exist, so for legacy the table list in
    /// `/proc/net/ip_tables_names` is read first, as Kubernetes' iptables-wrappers avoid
    /// naming a legacy table too. `iptables-nft-save -t filter` only reads.
    pub fn save_filter(self) -> Result<Option<String>> {
        if self == Backend::Legacy {
            match std::fs::read_to_string(LEGACY_TABLES) {
                Ok(names) if names.lines().any(|l| l.trim() == "filter") => {}
                Ok(_) => return Ok(None),
                // No ip_tables module: no legacy table exists.
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io(format!("read {LEGACY_TABLES}"))(e)),
            }
        }
        run(self.save_bin(), &["-t", "filter"]).map(Some)
    }

    /// Runs `<backend> -w 5 -t filter <args>` (`-w`: wait for the xtables lock that
    /// kube-proxy and Docker also take).
    pub fn filter(self, args: &[String]) -> Result<()> {
        let mut argv: Vec<&str> = vec!["-w", "5", "-t", "filter"];
        argv.extend(args.iter().map(String::as_str));
        run(self.name(), &argv).map(drop)
    }
}

const LEGACY_TABLES: &str = "/proc/net/ip_tables_names";

/// Whether an error means the iptables binary is not installed.
pub fn is_missing(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == ErrorKind::NotFound)
}

fn run(bin: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io(format!("run {bin}")))?;
    if !out.status.success() {
        return Err(Error::Iptables(format!(
            "{bin} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One chain of the `filter` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// `ACCEPT`/`DROP` for built-in chains, `None` for user chains (`-`).
    pub policy: Option<String>,
    /// Each rule's arguments after `-A <chain>`, unquoted (usable as argv again).
    pub rules: Vec<Vec<String>>,
}

/// The `*filter` section of `iptables-save` output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub chains: Vec<Chain>,
}

impl Filter {
    /// Parses the `*filter` section; `None` when the output has none.
    pub fn parse(save: &str) -> Option<Filter> {
        let mut lines = save.lines().map(str::trim);
        lines.find(|l| *l == "*filter")?;
        let mut f = Filter::default();
        for line in lines {
            if line == "COMMIT" || line.starts_with('*') {
                break;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let mut w = decl.split_whitespace();
                let Some(name) = w.next() else { continue };
                let policy = w.next().filter(|p| *p != "-").map(str::to_string);
                f.chain_mut(name).policy = policy;
            } else if line.starts_with("-A ") {
                let mut words = split_words(line).into_iter().skip(1);
                let Some(chain) = words.next() else { continue };
                f.chain_mut(&chain).rules.push(words.collect());
            }
        }
        Some(f)
    }

    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }

    fn chain_mut(&mut self, name: &str) -> &mut Chain {
        if let Some(i) = self.chains.iter().position(|c| c.name == name) {
            return &mut self.chains[i];
        }
        self.chains.push(Chain {
            name: name.to_string(),
            policy: None,
            rules: Vec::new(),
        });
        self.chains.last_mut().expect("just pushed")
    }
}

/// Splits a rule line into words the way iptables-restore does: whitespace separates,
/// `"…"` groups (iptables-save quotes comments), `\` escapes the next character.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut in_word) = (false, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `iptables-nft-save -t filter` on a Docker host (abridged), with a twill chain.
    const DOCKER: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables) on Wed Dec  2 10:57:05 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [12:720]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
:TWILL-FWD - [0:0]
-A FORWARD -m comment --comment "twill forward" -j TWILL-FWD
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A DOCKER-USER -j RETURN
-A TWILL-FWD -s 10.5.0.0/16 -m comment --comment "twill forward" -j ACCEPT
COMMIT
# Completed on Wed Dec  2 10:57:05 2026
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j DOCKER
COMMIT
"#;

    fn words(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn parses_policies_chains_and_rules_of_filter_only() {
        let f = Filter::parse(DOCKER).unwrap();
        let names: Vec<&str> = f.chains.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["INPUT", "FORWARD", "OUTPUT", "DOCKER-USER", "TWILL-FWD"]
        );
        let fwd = f.chain("FORWARD").unwrap();
        assert_eq!(fwd.policy.as_deref(), Some("DROP"));
        assert_eq!(
            fwd.rules[0],
            [
                "-m",
                "comment",
                "--comment",
                "twill forward",
                "-j",
                "TWILL-FWD"
            ]
        );
        assert_eq!(fwd.rules[1], words("-j DOCKER-USER"));
        assert_eq!(fwd.rules.len(), 3);
        assert_eq!(f.chain("DOCKER-USER").unwrap().policy, None);
        assert_eq!(
            f.chain("TWILL-FWD").unwrap().rules,
            [vec![
                "-s",
                "10.5.0.0/16",
                "-m",
                "comment",
                "--comment",
                "twill forward",
                "-j",
                "ACCEPT"
            ]]
        );
        assert!(f.chain("PREROUTING").is_none(), "nat is not filter");
    }

    #[test]
    fn no_filter_section_is_none() {
        assert_eq!(Filter::parse(""), None);
        assert_eq!(
            Filter::parse("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"),
            None
        );
    }

    #[test]
    fn words_follow_iptables_quoting() {
        assert_eq!(
            split_words(r#"-A X -m comment --comment "a \"b\" c\\d"  -j  ACCEPT"#),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                r#"a "b" c\d"#,
                "-j",
                "ACCEPT"
            ]
        );
        assert_eq!(split_words(r#"--comment """#), ["--comment", ""]);
    }
}
