//! The README's quick start, run as written against `concord dev`: every
//! `concord` line of its shell blocks (the ports moved to the test's
//! cluster), each one succeeding, and each line whose comment gives its
//! output (`# 7`, `# prints 5`) printing exactly that.

use std::process::Command;
use std::time::{Duration, Instant};

use concord_tests::binary;
use concord_tests::dev::Dev;

/// The shell blocks of the README's "Quick start" section.
fn quick_start_blocks(readme: &str) -> Vec<Vec<String>> {
    let start = readme
        .find("## Quick start")
        .expect("a Quick start section");
    let section = &readme[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in section[..end].lines() {
        match (&mut current, line.trim()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), l) if !l.is_empty() => block.push(l.to_string()),
            _ => {}
        }
    }
    blocks
}

/// The output a line's comment promises, when it names one value.
fn promised(comment: &str) -> Option<String> {
    let said = comment.trim();
    let said = said.strip_prefix("prints ").unwrap_or(said);
    (!said.contains(' ')).then(|| said.to_string())
}

#[test]
fn the_quick_start_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let blocks = quick_start_blocks(&readme);
    assert!(
        blocks.len() >= 2,
        "the quick start's shell blocks: {blocks:?}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path(), 3);
    let bin_dir = binary("concord")
        .parent()
        .expect("the binaries' directory")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ran = 0;
    for line in blocks.iter().flatten() {
        let (command, comment) = match line.split_once(" # ") {
            Some((command, comment)) => (command.trim(), Some(comment)),
            None => (line.as_str(), None),
        };
        // What needs a terminal, another machine or Ctrl-C.
        if !command.contains("concord ") || command.contains(" tail ") {
            continue;
        }
        let mut command = command.to_string();
        for i in 0..3 {
            command = command.replace(&format!("http://127.0.0.1:710{}", i + 1), &dev.endpoint(i));
        }
        let want = comment.and_then(promised);
        let read = [" get ", " members ", " contains "]
            .iter()
            .any(|r| command.contains(r));
        // Replication takes milliseconds, and the README's lines follow
        // each other faster than a person types them: a keyspace created
        // in one region may not be known yet in the next (nothing was
        // written then), and a read may come before the write it shows.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("sh")
                .args(["-c", &command])
                .env("PATH", &path)
                .env("CONCORD_ENDPOINT", dev.endpoint(0))
                .current_dir(dir.path())
                .output()
                .expect("run sh");
            let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            let early = Instant::now() < deadline;
            if !out.status.success() && stderr.contains("NOT_FOUND") && early {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            assert!(out.status.success(), "{line}\n{stdout}\n{stderr}");
            match &want {
                Some(want) if *want != stdout && read && early => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Some(want) => assert_eq!(&stdout, want, "{line}"),
                None => {}
            }
            break;
        }
        ran += 1;
    }
    assert!(ran >= 20, "only {ran} lines ran");
}
