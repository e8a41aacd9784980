//! `elb-quorum-assets DIR`: writes the man page (`DIR/elb-quorum.1`) and the bash, zsh and fish
//! completions (`DIR/elb-quorum.bash`, `DIR/_elb-quorum`, `DIR/elb-quorum.fish`) from the CLI
//! definition, for the Debian package (scripts/package). Built only with the `assets` feature.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use elb_quorum::cli::Cli;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: elb-quorum-assets DIR");
        return ExitCode::from(2);
    };
    match write(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("elb-quorum-assets: {}: {e}", dir.display());
            ExitCode::from(3)
        }
    }
}

fn write(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(dir.join("elb-quorum.1"), page)?;
    for (shell, file) in
        [(Shell::Bash, "elb-quorum.bash"), (Shell::Zsh, "_elb-quorum"), (Shell::Fish, "elb-quorum.fish")]
    {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, "elb-quorum", &mut out);
        std::fs::write(dir.join(file), out)?;
    }
    Ok(())
}
