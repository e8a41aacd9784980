//! `src/hot-text.ld` (release builds hand it to the linker, see build.rs) is accepted by the linker
//! rustc uses, and by GNU ld, and does what it is for: a function it names lands in
//! `.text.hot_elbq`, placed before `.text`, and one it does not name stays in `.text`. Checked on
//! small programs linked the way the binary is (`-T`, position-independent), because a release
//! build of the crate itself takes minutes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tool(name: &str, args: &[&str]) -> String {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{name}` ({e}): rustc comes with the Rust toolchain; cc, readelf and nm with gcc and binutils (Debian: apt-get install gcc binutils)"));
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

/// The script and a function name it matches: one of the crate's own functions (which ones survive
/// inlining depends on the build), its legacy-mangling hash (the `*`) filled in.
fn script_and_hot_name() -> (PathBuf, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/hot-text.ld");
    let text = std::fs::read_to_string(&script).expect("src/hot-text.ld exists (benches/hot_text.py writes it)");
    let patterns: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("*(.text."))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert!(patterns.len() >= 100, "an idle listener runs hundreds of functions; the list has {}", patterns.len());
    let pattern = patterns
        .iter()
        .find(|p| p.starts_with("_ZN10elb_quorum") && p.ends_with("17h*E"))
        .expect("src/hot-text.ld names functions of elb_quorum, hash left open");
    (script, pattern.replace('*', "0123456789abcdef"))
}

/// Writes `source` as `file` in a scratch directory, builds it with `compiler args… FILE -o EXE`,
/// runs it, then checks that `hot` lies in `.text.hot_elbq`, before `.text`, and that `cold` does not.
fn assert_laid_out(file: &str, source: String, compiler: &str, args: &[&str], hot: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (src, exe) = (dir.path().join(file), dir.path().join("prog"));
    std::fs::write(&src, source).unwrap();
    let (src, exe) = (src.to_str().unwrap(), exe.to_str().unwrap());
    tool(compiler, &[args, &[src, "-o", exe]].concat());
    let status = Command::new(exe).status().expect("the linked program runs");
    assert!(status.success(), "the program linked with the script runs: {status}");
    let sections = tool("readelf", &["-SW", exe]);
    let (hot_start, hot_size) = section(&sections, ".text.hot_elbq");
    let (text_start, _) = section(&sections, ".text");
    assert!(hot_start < text_start, ".text.hot_elbq comes before .text:\n{sections}");
    let nm = tool("nm", &[exe]);
    let (hot_at, cold_at) = (address(&nm, hot), address(&nm, "cold"));
    let in_hot = hot_start..hot_start + hot_size;
    assert!(in_hot.contains(&hot_at), "{hot} at {hot_at:#x} is in the hot section\n{sections}");
    assert!(!in_hot.contains(&cold_at), "cold at {cold_at:#x} is not\n{sections}");
}

/// With rustc and its default linker (rust-lld on current toolchains), given the script as build.rs gives it.
#[test]
fn rustc_linker_places_listed_functions_in_the_hot_section() {
    let (script, hot) = script_and_hot_name();
    let source = format!(
        "#[export_name = \"{hot}\"]\n\
         #[inline(never)]\n\
         pub fn hot(x: usize) -> usize {{ x * 3 + 1 }}\n\
         #[no_mangle]\n\
         #[inline(never)]\n\
         pub fn cold(x: usize) -> usize {{ x * 5 + 2 }}\n\
         fn main() {{ let n = std::env::args().count(); std::process::exit((hot(n) + cold(n) == 0) as i32) }}\n"
    );
    let link_arg = format!("link-arg=-Wl,-T,{}", script.display()); // as build.rs passes it
    assert_laid_out("prog.rs", source, "rustc", &["-O", "--edition", "2021", "-C", &link_arg], &hot);
}

/// With the system's C compiler and GNU ld (for builds configured to link with it), position-independent.
#[test]
fn gnu_ld_places_listed_functions_in_the_hot_section() {
    let (script, hot) = script_and_hot_name();
    let source = format!(
        "int hot(int x) __asm__(\"{hot}\");\n\
         int hot(int x) {{ return x * 3 + 1; }}\n\
         int cold(int x) {{ return x * 5 + 2; }}\n\
         int main(int argc, char **argv) {{ (void)argv; return hot(argc) + cold(argc) == 0; }}\n"
    );
    let t = format!("-Wl,-T,{}", script.display());
    assert_laid_out("prog.c", source, "cc", &["-O1", "-fPIE", "-pie", "-ffunction-sections", "-fuse-ld=bfd", &t], &hot);
}
