//! Plain-text tables of the lab's nodes, pods and connectivity.

use std::fmt::Write;

use crate::probe::Reach;
use crate::Lab;

/// Left-aligned columns sized to their widest cell.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut s = String::new();
    let line = |s: &mut String, cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = widths[i]))
            .collect();
        let _ = writeln!(s, "{}", text.join("  ").trim_end());
    };
    line(&mut s, header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(&mut s, r.clone());
    }
    s
}

pub fn nodes(lab: &Lab) -> String {
    let rows: Vec<Vec<String>> = lab
        .nodes()
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                lab.node_state(&n.name).to_string(),
                n.ip.to_string(),
                lab.subnet(&n.name)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                lab.daemon_pid(&n.name)
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                n.ns.clone(),
            ]
        })
        .collect();
    render(
        &[
            "NODE",
            "STATE",
            "UNDERLAY IP",
            "SUBNET",
            "TWILLD PID",
            "NETNS",
        ],
        &rows,
    )
}

pub fn pods(lab: &Lab) -> String {
    let rows: Vec<Vec<String>> = lab
        .pods()
        .iter()
        .map(|p| {
            vec![
                p.node.clone(),
                p.name.clone(),
                p.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                p.ns.clone(),
            ]
        })
        .collect();
    render(&["NODE", "POD", "IP", "NETNS"], &rows)
}

pub fn matrix(lab: &Lab, m: &[Vec<Option<Reach>>]) -> String {
    let labels: Vec<String> = lab
        .pods()
        .iter()
        .map(|p| format!("{}/{}", p.node, p.name))
        .collect();
    let mut header = vec!["FROM \\ TO"];
    header.extend(labels.iter().map(String::as_str));
    let mut ok = 0;
    let mut total = 0;
    let rows: Vec<Vec<String>> = m
        .iter()
        .enumerate()
        .map(|(i, row)| {
            std::iter::once(labels.get(i).cloned().unwrap_or_default())
                .chain(row.iter().map(|c| match c {
                    None => ".".to_string(),
                    Some(r) => {
                        total += 1;
                        if r.ok() {
                            ok += 1;
                        }
                        match (r.ping, r.tcp) {
                            (true, true) => "ok".into(),
                            (false, true) => "NO-PING".into(),
                            (true, false) => "NO-TCP".into(),
                            (false, false) => "FAIL".into(),
                        }
                    }
                }))
                .collect()
        })
        .collect();
    format!(
        "connectivity (ping + TCP echo, row -> column): {ok}/{total} pairs ok\n{}",
        render(&header, &rows)
    )
}
