//! Child processes that die with their parent.
//!
//! `herald dev` runs nats-server as a child. On a graceful stop it ends
//! that child itself (SIGTERM), but when `herald dev` is killed outright
//! (SIGKILL, the OOM killer, a crash) the child would live on, holding its
//! port, and the next `herald dev` could not start. On Linux a child can
//! ask for a signal when its parent dies (`PR_SET_PDEATHSIG`), but only for
//! itself, between fork and exec: `pre_exec` would need unsafe code, which
//! the workspace forbids. So the child is started through herald itself:
//! [`command`] runs `herald child-of <pid> -- <program> <args>`, whose
//! [`exec`] sets the parent-death signal with nix's safe wrapper and then
//! replaces itself with the program, which keeps the setting.
//!
//! (util-linux's `setpriv --pdeathsig KILL` does the same, but it would
//! be one more program `make dev` needs, and it does not catch a parent
//! that died before the setting was made; [`exec`] does.)

use std::{ffi::OsString, path::Path, path::PathBuf};

use clap::Args;

/// `herald child-of`: hidden; see the module documentation.
#[derive(Args)]
pub struct ChildArgs {
    /// The process whose death ends this one.
    parent: u32,
    /// The program to become, and its arguments.
    program: PathBuf,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

/// A command that runs `program` as a child of this process that gets
/// SIGKILL when this process dies (on Linux; elsewhere a plain child).
///
/// The parent-death signal follows the *thread* that spawned the child:
/// spawn from a thread that lives as long as the process (the main thread,
/// or a runtime worker), never from `spawn_blocking`, whose threads end
/// when idle.
pub fn command(program: &Path) -> anyhow::Result<tokio::process::Command> {
    if cfg!(target_os = "linux") {
        let herald = std::env::current_exe()?;
        let mut command = tokio::process::Command::new(herald);
        command
            .arg("child-of")
            .arg(std::process::id().to_string())
            .arg("--")
            .arg(program);
        Ok(command)
    } else {
        Ok(tokio::process::Command::new(program))
    }
}

/// Sets the parent-death signal, checks the parent is still the one that
/// started us, and becomes the program. Returns only on failure.
pub fn exec(args: ChildArgs) -> anyhow::Error {
    #[cfg(target_os = "linux")]
    {
        use anyhow::Context;
        if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .context("cannot set the parent-death signal")
        {
            return e;
        }
        // A parent that died before the line above sent no signal: then
        // this process was already handed to another parent.
        if nix::unistd::getppid().as_raw() as u32 != args.parent {
            return anyhow::anyhow!("parent {} is gone; not starting", args.parent);
        }
    }
    use std::os::unix::process::CommandExt;
    let error = std::process::Command::new(&args.program)
        .args(&args.args)
        .exec();
    anyhow::Error::new(error).context(format!("cannot run {}", args.program.display()))
}
