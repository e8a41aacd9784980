//! The packaged build (`cargo build --profile dist`, see Cargo.toml) lays out the code an idle
//! listener runs in one place (`src/hot-text.ld`, written by `benches/hot_text.py`): its resident
//! text shrinks by about 3 MiB (benches/README.md). Other builds, `cargo install` among them, link
//! as usual, with whatever linker is configured. `ELB_QUORUM_HOT_TEXT=0` leaves the script out of a
//! dist build too, for a linker that does not take GNU linker scripts with INSERT (GNU ld and lld
//! do) or to train a new list.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=src/hot-text.ld");
    println!("cargo:rerun-if-env-changed=ELB_QUORUM_HOT_TEXT");
    let linux = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    let wanted = env::var("ELB_QUORUM_HOT_TEXT").as_deref() != Ok("0");
    if linux && profile().as_deref() == Some("dist") && wanted {
        let script =
            Path::new(&env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("src/hot-text.ld");
        if script.exists() {
            // `-T` with a script of INSERT commands augments the linker's default layout (GNU ld
            // wants `-T` for INSERT; lld takes it the same way).
            println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
        } else {
            println!(
                "cargo:warning=src/hot-text.ld is missing: linking without it (python benches/hot_text.py writes it)"
            );
        }
    }
}

/// The profile's own name: cargo's `PROFILE` says only "release" or "debug", but the build script's
/// output directory is `<target>/[<triple>/]<profile>/build/<package>-<hash>/out`.
fn profile() -> Option<String> {
    let out = env::var_os("OUT_DIR")?;
    let name = Path::new(&out).ancestors().nth(3)?.file_name()?;
    Some(name.to_string_lossy().into_owned())
}
