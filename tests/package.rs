//! The Debian package. `scripts/package` builds it with cargo-deb from the dist profile, which takes
//! longer than the whole test command (benches/README.md, "Build"); this test checks what goes into
//! it instead: the man page and completions that `elb-quorum-assets` writes, and a `.deb` laid out
//! from `[package.metadata.deb]` in Cargo.toml the way cargo-deb lays it out (`target/release/` is
//! the build's output directory, man pages gzipped, files under /etc are conffiles), built with
//! `dpkg-deb --build` around this build's binary, listed with `dpkg-deb -c`, unpacked with
//! `dpkg-deb -x`, and the unpacked binary run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (Debian: apt-get install dpkg groff-base gzip bash)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs elb-quorum-assets into a fresh directory.
fn assets() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("package-assets");
    run(Command::new(env!("CARGO_BIN_EXE_elb-quorum-assets")).arg(&dir));
    (tmp, dir)
}

#[test]
fn man_page_renders_every_subcommand_and_option_default() {
    let (_tmp, dir) = assets();
    let page = std::fs::read_to_string(dir.join("elb-quorum.1")).unwrap();
    assert!(page.starts_with(".ie") || page.contains(".TH elb-quorum 1"), "not a man page:\n{page}");
    // Rendered the way man(1) renders it (preconv for the UTF-8 text, -k); a roff error would show
    // as a warning on stderr.
    let out = run(Command::new("groff").args(["-k", "-man", "-Tutf8", "-ww"]).arg(dir.join("elb-quorum.1")));
    assert!(out.stderr.is_empty(), "groff warned: {}", String::from_utf8_lossy(&out.stderr));
    let rendered = String::from_utf8_lossy(&out.stdout).replace("\u{2010}", "-").replace("\u{2212}", "-");
    // groff marks bold by overstriking in some setups; strip backspace pairs.
    let rendered = strip_overstrike(&rendered);
    let rendered = squash(&rendered);
    for want in [
        "elb-quorum",
        "listen",
        "restart",
        "request",
        "status",
        "lease",
        "--quorum",
        "--target-group",
        "--strict",
        "--metrics-file",
        "[default: 0.75]",
        "Exit codes: 0 done",
    ] {
        assert!(rendered.contains(want), "the man page lacks {want:?}:\n{rendered}");
    }
}

fn strip_overstrike(s: &str) -> String {
    let mut out: Vec<char> = Vec::with_capacity(s.len());
    for c in s.chars() {
        if c == '\u{8}' {
            out.pop();
            continue;
        }
        out.push(c);
    }
    out.into_iter().collect()
}

#[test]
fn completions_name_the_subcommands_and_bash_parses_its_own() {
    let (_tmp, dir) = assets();
    let bash = std::fs::read_to_string(dir.join("elb-quorum.bash")).unwrap();
    let zsh = std::fs::read_to_string(dir.join("_elb-quorum")).unwrap();
    let fish = std::fs::read_to_string(dir.join("elb-quorum.fish")).unwrap();
    assert!(zsh.starts_with("#compdef elb-quorum"), "zsh completion header:\n{zsh}");
    assert!(fish.contains("complete -c elb-quorum"), "fish completion:\n{fish}");
    for (shell, body) in [("bash", &bash), ("zsh", &zsh), ("fish", &fish)] {
        for want in ["listen", "restart", "request", "status", "lease", "--target-group", "--strict"] {
            assert!(body.contains(want), "{shell} completion lacks {want:?}");
        }
    }
    run(Command::new("bash").arg("-n").arg(dir.join("elb-quorum.bash")));
    // Sourced and asked, through the function the script registers: `elb-quorum st<TAB>` offers status.
    let function = bash
        .lines()
        .find_map(|l| l.split("complete -F ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the bash completion registers a function with complete -F");
    let script = format!(
        "source {}; COMP_WORDS=(elb-quorum st); COMP_CWORD=1; COMP_LINE='elb-quorum st'; COMP_POINT=13; \
         {function} elb-quorum st elb-quorum; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        dir.join("elb-quorum.bash").display()
    );
    let out = run(Command::new("bash").arg("-c").arg(script));
    let offered: Vec<String> = text(&out).lines().map(str::to_owned).collect();
    assert!(offered.iter().any(|w| w == "status"), "bash completion of `st`: {offered:?}");
}

/// `[package.metadata.deb]` from Cargo.toml.
fn deb_metadata() -> toml::Table {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let doc: toml::Table = toml::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    doc["package"]["metadata"]["deb"].as_table().expect("[package.metadata.deb] in Cargo.toml").clone()
}

#[test]
fn deb_holds_binary_drop_in_example_man_page_completions_and_state_dir() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (tmp, asset_dir) = assets();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_elb-quorum")).parent().unwrap().to_path_buf();
    let meta = deb_metadata();
    assert_eq!(meta["profile"].as_str(), Some("dist"), "the package is built from the dist profile");
    let stage = tmp.path().join("stage");
    let mut conffiles = Vec::new();
    for asset in meta["assets"].as_array().expect("assets = [...]") {
        let asset = asset.as_array().expect("each asset is [source, destination, mode]");
        let (src, dest, mode) = (asset[0].as_str().unwrap(), asset[1].as_str().unwrap(), asset[2].as_str().unwrap());
        let source = if let Some(rest) = src.strip_prefix("target/release/") {
            bin_dir.join(rest)
        } else if let Some(rest) = src.strip_prefix("target/package-assets/") {
            asset_dir.join(rest)
        } else {
            root.join(src)
        };
        assert!(source.is_file(), "asset {src} ({}) is missing", source.display());
        let mut dest = if dest.ends_with('/') {
            format!("{dest}{}", source.file_name().unwrap().to_string_lossy())
        } else {
            dest.to_owned()
        };
        let mut bytes = std::fs::read(&source).unwrap();
        if dest.starts_with("usr/share/man/") {
            let out = run(Command::new("sh").arg("-c").arg("gzip -9n -c \"$0\"").arg(&source));
            bytes = out.stdout;
            dest.push_str(".gz");
        }
        if dest.starts_with("etc/") {
            conffiles.push(format!("/{dest}"));
        }
        let path = stage.join(&dest);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let mode = u32::from_str_radix(mode, 8).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    let arch = text(&run(Command::new("dpkg").arg("--print-architecture"))).trim().to_owned();
    std::fs::create_dir_all(stage.join("DEBIAN")).unwrap();
    let field = |k: &str| meta.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let description =
        field("extended-description").lines().map(|l| format!(" {}", l.trim())).collect::<Vec<_>>().join("\n");
    std::fs::write(
        stage.join("DEBIAN/control"),
        format!(
            "Package: elb-quorum\nVersion: {}-1\nArchitecture: {arch}\nMaintainer: {}\nSection: {}\nPriority: {}\n\
             Recommends: {}\nDescription: {}\n{description}\n",
            env!("CARGO_PKG_VERSION"),
            field("maintainer"),
            field("section"),
            field("priority"),
            field("recommends"),
            env!("CARGO_PKG_DESCRIPTION"),
        ),
    )
    .unwrap();
    std::fs::write(stage.join("DEBIAN/conffiles"), conffiles.join("\n") + "\n").unwrap();
    let deb = tmp.path().join("elb-quorum.deb");
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zgzip", "--build"]).arg(&stage).arg(&deb));

    let listing = text(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)));
    let entry = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" ./{path}")))
            .unwrap_or_else(|| panic!("the package lacks /{path}:\n{listing}"))
            .to_owned()
    };
    assert!(entry("usr/bin/elb-quorum").starts_with("-rwxr-xr-x root/root"), "{}", entry("usr/bin/elb-quorum"));
    for path in [
        "etc/supervisor/conf.d/elb-quorum.conf",
        "usr/share/doc/elb-quorum/examples/elb-quorum.toml",
        "usr/share/man/man1/elb-quorum.1.gz",
        "usr/share/bash-completion/completions/elb-quorum",
        "usr/share/zsh/vendor-completions/_elb-quorum",
        "usr/share/fish/vendor_completions.d/elb-quorum.fish",
        "var/lib/elb-quorum/",
    ] {
        assert!(entry(path).starts_with(if path.ends_with('/') {
            "drwxr-xr-x root/root"
        } else {
            "-rw-r--r-- root/root"
        }));
    }
    assert_eq!(text(&run(Command::new("dpkg-deb").args(["-f"]).arg(&deb).arg("Package"))).trim(), "elb-quorum");

    let unpacked = tmp.path().join("unpacked");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked));
    let bin = unpacked.join("usr/bin/elb-quorum");
    let version = text(&run(Command::new(&bin).arg("--version")));
    assert_eq!(version.trim(), format!("elb-quorum {}", env!("CARGO_PKG_VERSION")));
    let help = text(&run(Command::new(&bin).arg("--help")));
    assert!(help.contains("Usage: elb-quorum") && help.contains("listen"), "{help}");
    // The drop-in starts a binary the package holds, found on supervisord's PATH.
    let drop_in = std::fs::read_to_string(unpacked.join("etc/supervisor/conf.d/elb-quorum.conf")).unwrap();
    let command = drop_in.lines().find_map(|l| l.strip_prefix("command=")).expect("command= in the drop-in");
    let program = command.split_whitespace().next().unwrap();
    let resolved = match program.strip_prefix('/') {
        Some(absolute) => unpacked.join(absolute),
        None => unpacked.join("usr/bin").join(program),
    };
    assert!(resolved.is_file(), "the drop-in runs {program}, which the package does not hold");
    assert!(command.split_whitespace().nth(1) == Some("listen"), "the drop-in runs {command:?}");
    let example = std::fs::read_to_string(unpacked.join("usr/share/doc/elb-quorum/examples/elb-quorum.toml")).unwrap();
    assert!(example.contains("quorum"), "example TOML");
}
