//! Plain-text tables of the lab's nodes, pods and connectivity.

use std::fmt::Write;

use crate::probe::Reach;
use crate::Lab;

/// Left-aligned columns sized to their widest cell.
pub(crate) fn render(header: &[&str], rows: &[Vec<String>]) -> String {
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

/// Rows shown at each end of a large lab's node table.
const EDGE_ROWS: usize = 5;

/// The node table; beyond [`crate::DETAIL_NODES`] nodes, counts per state and the first and
/// last rows only.
pub fn nodes(lab: &Lab) -> String {
    let all = lab.nodes();
    let large = all.len() > crate::DETAIL_NODES;
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    if large {
        for n in all {
            *counts
                .entry(lab.node_state(&n.name).to_string())
                .or_default() += 1;
        }
    }
    let shown: Vec<&crate::NodeRec> = if large {
        all.iter()
            .take(EDGE_ROWS)
            .chain(all.iter().skip(all.len() - EDGE_ROWS))
            .collect()
    } else {
        all.iter().collect()
    };
    let rows: Vec<Vec<String>> = shown
        .into_iter()
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
    let table = render(
        &[
            "NODE",
            "STATE",
            "UNDERLAY IP",
            "SUBNET",
            "TWILLD PID",
            "NETNS",
        ],
        &rows,
    );
    if !large {
        return table;
    }
    let states: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let mut lines: Vec<&str> = table.lines().collect();
    let gap = format!("... {} more ...", all.len() - 2 * EDGE_ROWS);
    lines.insert(1 + EDGE_ROWS, &gap);
    format!(
        "{} nodes: {} (first and last {EDGE_ROWS} shown)\n{}\n",
        all.len(),
        states.join(", "),
        lines.join("\n")
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

/// Sampled ordered pod pairs and their outcome.
pub fn sampled(lab: &Lab, pairs: &[(usize, usize)], reach: &[Reach]) -> String {
    let label = |i: usize| {
        lab.pods()
            .get(i)
            .map(|p| format!("{}/{}", p.node, p.name))
            .unwrap_or_default()
    };
    let ok = reach.iter().filter(|r| r.ok()).count();
    let n = lab.pods().len();
    let failed: Vec<Vec<String>> = pairs
        .iter()
        .zip(reach)
        .filter(|(_, r)| !r.ok())
        .map(|((i, j), r)| vec![label(*i), label(*j), cell(r)])
        .collect();
    let mut s = format!(
        "connectivity (ping + TCP echo) on {} sampled ordered pairs of {} pods ({} pairs in all): \
         {ok}/{} ok\n",
        pairs.len(),
        n,
        n * n.saturating_sub(1),
        pairs.len()
    );
    if !failed.is_empty() {
        s.push_str(&render(&["FROM", "TO", "RESULT"], &failed));
    }
    s
}

fn cell(r: &Reach) -> String {
    match (r.ping, r.tcp) {
        (true, true) => "ok".into(),
        (false, true) => "NO-PING".into(),
        (true, false) => "NO-TCP".into(),
        (false, false) => "FAIL".into(),
    }
}
