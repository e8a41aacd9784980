//! `src/hot-text.ld` (release builds hand it to the linker, see build.rs) is accepted by the linker
//! rustc uses and does what it is for: a function it names lands in `.text.hot_elbq`, placed before
//! `.text`, and one it does not name stays in `.text`. Checked on a small Rust program linked the
//! way the binary is (same rustc, same default linker, position-independent), because a release
//! build of the crate itself takes minutes.

use std::path::Path;
use std::process::Command;

fn tool(name: &str, args: &[&str]) -> String {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{name}` ({e}): it comes with the Rust toolchain and binutils (Debian: apt-get install binutils)"));
    assert!(out.status.success(), "{name} {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("tool output is text")
}

/// Address of `symbol` in `nm`'s listing.
fn address(nm: &str, symbol: &str) -> u64 {
    let line =
        nm.lines().find(|l| l.ends_with(&format!(" {symbol}"))).unwrap_or_else(|| panic!("{symbol} not in:\n{nm}"));
    u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap()
}

/// Start and size of a section in `readelf -SW`'s listing.
fn section(readelf: &str, name: &str) -> (u64, u64) {
    let line = readelf
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == name))
        .unwrap_or_else(|| panic!("no section {name} in:\n{readelf}"));
    let words: Vec<&str> = line.split(']').nth(1).unwrap().split_whitespace().collect();
    // Name Type Address Off Size ...
    (u64::from_str_radix(words[2], 16).unwrap(), u64::from_str_radix(words[4], 16).unwrap())
}

#[test]
fn the_linker_places_listed_functions_in_the_hot_section() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/hot-text.ld");
    let text = std::fs::read_to_string(&script).expect("src/hot-text.ld exists (benches/hot_text.py writes it)");
    let patterns: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("*(.text."))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert!(patterns.len() >= 100, "an idle listener runs hundreds of functions; the list has {}", patterns.len());
    // One of the crate's own functions (which ones survive inlining depends on the build), with its
    // legacy-mangling hash left open.
    let pattern = patterns
        .iter()
        .find(|p| p.starts_with("_ZN10elb_quorum") && p.ends_with("17h*E"))
        .expect("src/hot-text.ld names functions of elb_quorum, hash left open");
    // A name the pattern matches: each `*` stands for a legacy hash or a disambiguator.
    let hot = pattern.replace('*', "0123456789abcdef");

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("prog.rs");
    std::fs::write(
        &src,
        format!(
            "#[export_name = \"{hot}\"]\n\
             #[inline(never)]\n\
             pub fn hot(x: usize) -> usize {{ x * 3 + 1 }}\n\
             #[no_mangle]\n\
             #[inline(never)]\n\
             pub fn cold(x: usize) -> usize {{ x * 5 + 2 }}\n\
             fn main() {{ let n = std::env::args().count(); std::process::exit((hot(n) + cold(n) == 0) as i32) }}\n"
        ),
    )
    .unwrap();
    let exe = dir.path().join("prog");
    let link_arg = format!("link-arg={}", script.display());
    tool("rustc", &["-O", "--edition", "2021", "-C", &link_arg, src.to_str().unwrap(), "-o", exe.to_str().unwrap()]);
    let status = Command::new(&exe).status().expect("the linked program runs");
    assert!(status.success(), "the program linked with the script runs: {status}");

    let sections = tool("readelf", &["-SW", exe.to_str().unwrap()]);
    let (hot_start, hot_size) = section(&sections, ".text.hot_elbq");
    let (text_start, _) = section(&sections, ".text");
    assert!(hot_start < text_start, ".text.hot_elbq comes before .text:\n{sections}");
    let nm = tool("nm", &[exe.to_str().unwrap()]);
    let (hot_at, cold_at) = (address(&nm, &hot), address(&nm, "cold"));
    assert!(
        (hot_start..hot_start + hot_size).contains(&hot_at),
        "{hot} at {hot_at:#x} is in the hot section\n{sections}"
    );
    assert!(!(hot_start..hot_start + hot_size).contains(&cold_at), "cold at {cold_at:#x} is not\n{sections}");
}
