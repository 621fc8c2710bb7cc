//! The dispatcher every plugin's `main` calls: env + stdin → verb → stdout/exit code.

use std::io::{Read, Write};

use serde_json::json;

use super::conf::NetConf;
use super::env::{validate_network_name, Command, Env};
use super::error::{code, CniError};
use super::result::CniResult;
use super::version::{check_supported, Version, CURRENT_VERSION, SUPPORTED_VERSIONS};

/// Everything a verb handler gets.
#[derive(Debug, Clone)]
pub struct Request {
    pub env: Env,
    /// Parsed stdin.
    pub conf: NetConf,
    /// Raw stdin, to hand unchanged to a delegate.
    pub stdin: Vec<u8>,
}

/// A CNI plugin. ADD returns the result (printed in the config's version); the other verbs
/// print nothing on success. STATUS and GC default to success for plugins without state.
pub trait Plugin {
    fn add(&self, req: &Request) -> Result<CniResult, CniError>;
    fn del(&self, req: &Request) -> Result<(), CniError>;
    fn check(&self, req: &Request) -> Result<(), CniError>;
    fn status(&self, _req: &Request) -> Result<(), CniError> {
        Ok(())
    }
    fn gc(&self, _req: &Request) -> Result<(), CniError> {
        Ok(())
    }
    /// The versions this plugin accepts in `cniVersion`.
    fn versions(&self) -> &'static [&'static str] {
        SUPPORTED_VERSIONS
    }
    /// One line for a human who runs the binary without `CNI_COMMAND`.
    fn about(&self) -> String;
}

/// What the process should print and return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: Vec<u8>) -> Outcome {
        Outcome {
            stdout,
            stderr: Vec::new(),
            exit_code: 0,
        }
    }

    fn err(e: &CniError, version: &str) -> Outcome {
        let mut stdout = e.to_json(version).to_string().into_bytes();
        stdout.push(b'\n');
        Outcome {
            stdout,
            stderr: Vec::new(),
            exit_code: 1,
        }
    }
}

/// Runs one invocation with env from `lookup` and `stdin`; pure apart from what the handlers do.
pub fn dispatch<P: Plugin + ?Sized>(
    plugin: &P,
    lookup: impl Fn(&str) -> Option<String>,
    stdin: impl Read,
) -> Outcome {
    if lookup("CNI_COMMAND").unwrap_or_default().is_empty() {
        let versions = plugin.versions().join(", ");
        let stderr = format!(
            "{}\nCNI protocol versions supported: {versions}\n",
            plugin.about()
        )
        .into_bytes();
        return Outcome {
            stdout: Vec::new(),
            stderr,
            exit_code: 0,
        };
    }
    let env = match Env::from_lookup(&lookup) {
        Ok(e) => e,
        Err(e) => return Outcome::err(&e, CURRENT_VERSION),
    };
    let mut raw = Vec::new();
    if let Err(e) = { stdin }.read_to_end(&mut raw) {
        return Outcome::err(
            &CniError::new(code::IO_FAILURE, format!("error reading from stdin: {e}")),
            CURRENT_VERSION,
        );
    }
    if env.command == Command::Version {
        let v = json!({"cniVersion": CURRENT_VERSION, "supportedVersions": plugin.versions()});
        return Outcome::ok(format!("{v}\n").into_bytes());
    }
    let conf = match NetConf::parse(&raw) {
        Ok(c) => c,
        Err(e) => return Outcome::err(&e, CURRENT_VERSION),
    };
    let version = conf.version().to_string();
    let req = Request {
        env,
        conf,
        stdin: raw,
    };
    match run_verb(plugin, &req) {
        Ok(out) => Outcome::ok(out),
        Err(e) => {
            // Report in a version the caller can parse; an unsupported one falls back to ours.
            let v = if plugin.versions().contains(&version.as_str()) {
                version.as_str()
            } else {
                CURRENT_VERSION
            };
            Outcome::err(&e, v)
        }
    }
}

fn run_verb<P: Plugin + ?Sized>(plugin: &P, req: &Request) -> Result<Vec<u8>, CniError> {
    let version = req.conf.version();
    check_supported(version, plugin.versions())?;
    let ver = Version::parse(version)?;
    let need = |min: Version, verb: &str| {
        if ver < min {
            Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("config version does not allow {verb}"),
            ))
        } else {
            Ok(())
        }
    };
    match req.env.command {
        Command::Check => need(Version::V0_4_0, "CHECK")?,
        Command::Status => need(Version::V1_1_0, "STATUS")?,
        Command::Gc => need(Version::V1_1_0, "GC")?,
        _ => {}
    }
    req.env.validate()?;
    if matches!(
        req.env.command,
        Command::Add | Command::Del | Command::Check | Command::Gc
    ) {
        validate_network_name(&req.conf.name)?;
    }
    match req.env.command {
        Command::Add => {
            let r = plugin.add(req)?;
            let mut out = r.to_value(version)?.to_string().into_bytes();
            out.push(b'\n');
            Ok(out)
        }
        Command::Del => plugin.del(req).map(|()| Vec::new()),
        Command::Check => plugin.check(req).map(|()| Vec::new()),
        Command::Status => plugin.status(req).map(|()| Vec::new()),
        Command::Gc => plugin.gc(req).map(|()| Vec::new()),
        Command::Version => Ok(Vec::new()),
    }
}

/// The plugin's `main`: dispatches on the process env and stdin, prints, and exits.
pub fn run<P: Plugin + ?Sized>(plugin: &P) -> ! {
    let out = dispatch(plugin, |k| std::env::var(k).ok(), std::io::stdin().lock());
    let _ = std::io::stderr().write_all(&out.stderr);
    let mut so = std::io::stdout().lock();
    let _ = so.write_all(&out.stdout);
    let _ = so.flush();
    std::process::exit(out.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Fake;
    impl Plugin for Fake {
        fn add(&self, req: &Request) -> Result<CniResult, CniError> {
            if req.conf.extra.contains_key("fail") {
                return Err(CniError::new(code::TRY_AGAIN_LATER, "busy"));
            }
            CniResult::from_value(
                &json!({"ips":[{"address":"10.0.0.2/24","gateway":"10.0.0.1"}]}),
                "1.0.0",
            )
        }
        fn del(&self, _: &Request) -> Result<(), CniError> {
            Ok(())
        }
        fn check(&self, _: &Request) -> Result<(), CniError> {
            Ok(())
        }
        fn about(&self) -> String {
            "fake".into()
        }
    }

    fn call(cmd: &str, stdin: &str) -> (serde_json::Value, i32) {
        let env: HashMap<&str, &str> = [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/bin"),
        ]
        .into();
        let out = dispatch(
            &Fake,
            |k| env.get(k).map(|s| s.to_string()),
            stdin.as_bytes(),
        );
        let v = if out.stdout.is_empty() {
            json!(null)
        } else {
            serde_json::from_slice(&out.stdout).unwrap()
        };
        (v, out.exit_code)
    }

    #[test]
    fn verbs_versions_and_errors() {
        let (v, rc) = call("ADD", r#"{"cniVersion":"0.2.0","name":"n","type":"fake"}"#);
        assert_eq!((rc, v["ip4"]["ip"].as_str()), (0, Some("10.0.0.2/24")));
        let (v, rc) = call("ADD", r#"{"cniVersion":"0.4.0","name":"n","type":"fake"}"#);
        assert_eq!((rc, v["ips"][0]["version"].as_str()), (0, Some("4")));
        let (v, rc) = call("ADD", r#"{"cniVersion":"9.0.0","name":"n","type":"fake"}"#);
        assert_eq!((rc, v["code"].as_u64()), (1, Some(1)));
        let (v, _) = call("ADD", "{bad");
        assert_eq!(v["code"], 6);
        let (v, _) = call(
            "ADD",
            r#"{"cniVersion":"1.0.0","name":"n/x","type":"fake"}"#,
        );
        assert_eq!(v["code"], 7);
        let (v, _) = call(
            "ADD",
            r#"{"cniVersion":"1.0.0","name":"n","type":"fake","fail":1}"#,
        );
        assert_eq!(
            (v["code"].as_u64(), v["cniVersion"].as_str()),
            (Some(11), Some("1.0.0"))
        );
        let (v, _) = call(
            "CHECK",
            r#"{"cniVersion":"0.3.1","name":"n","type":"fake"}"#,
        );
        assert_eq!(v["code"], 1);
        let (v, _) = call(
            "STATUS",
            r#"{"cniVersion":"1.0.0","name":"n","type":"fake"}"#,
        );
        assert_eq!(v["code"], 1);
        let (v, rc) = call(
            "STATUS",
            r#"{"cniVersion":"1.1.0","name":"n","type":"fake"}"#,
        );
        assert_eq!((v, rc), (json!(null), 0));
        let (v, rc) = call("VERSION", r#"{"cniVersion":"0.3.1"}"#);
        assert_eq!(rc, 0);
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED_VERSIONS.len()
        );
    }
}
