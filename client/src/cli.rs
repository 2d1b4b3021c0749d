//! How the command-line programs (`floto`, `floto-tunnel`, `floto-vpn-server`) start and end:
//! the TLS provider, the tokio runtime, and the one place an error reaches the user.
// The one place the programs' errors are printed.
#![allow(clippy::print_stderr)]

use std::future::Future;
use std::process::ExitCode;

/// A command-line program: how it reports the error that ends it, and what it does with
/// work left over when it ends.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    error_prefix: &'static str,
    exit_code: fn(&anyhow::Error) -> ExitCode,
    wait_for_blocking_tasks: bool,
}

impl Program {
    /// Errors are printed to stderr as `{error_prefix}: {error:#}` and exit with status 1.
    pub fn new(error_prefix: &'static str) -> Self {
        Self {
            error_prefix,
            exit_code: |_| ExitCode::FAILURE,
            wait_for_blocking_tasks: true,
        }
    }

    /// Chooses the exit status of an error (EX_USAGE for a bad config, for example).
    #[must_use]
    pub fn exit_code(self, exit_code: fn(&anyhow::Error) -> ExitCode) -> Self {
        Self { exit_code, ..self }
    }

    /// Ends without waiting for blocking tasks, such as a thread blocked reading stdin that
    /// nothing can cancel.
    #[must_use]
    pub fn abandon_blocking_tasks(self) -> Self {
        Self {
            wait_for_blocking_tasks: false,
            ..self
        }
    }

    /// Installs the TLS crypto provider, runs `main` on a multi-thread tokio runtime and
    /// returns its exit status, or prints its error and returns the error's status.
    pub fn run(self, main: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
        crate::tls::install_default_provider();
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("{}: cannot start the async runtime: {e}", self.error_prefix);
                return ExitCode::FAILURE;
            }
        };
        let result = runtime.block_on(main);
        if !self.wait_for_blocking_tasks {
            runtime.shutdown_background();
        }
        match result {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{}: {e:#}", self.error_prefix);
                (self.exit_code)(&e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_future_chooses_the_status_and_errors_exit_1() {
        let program = Program::new("test");
        assert_eq!(
            program.run(async { Ok(ExitCode::from(3)) }),
            ExitCode::from(3)
        );
        assert_eq!(
            program.run(async { anyhow::bail!("no") }),
            ExitCode::FAILURE
        );
    }

    #[test]
    fn errors_get_the_status_the_program_chooses() {
        use anyhow::Context as _;

        #[derive(Debug, thiserror::Error)]
        #[error("bad config")]
        struct BadConfig;
        let program = Program::new("test").exit_code(|e| {
            if e.downcast_ref::<BadConfig>().is_some() {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            }
        });
        assert_eq!(
            program.run(async { Err(BadConfig).context("while reading the config") }),
            ExitCode::from(64)
        );
        assert_eq!(
            program.run(async { anyhow::bail!("other") }),
            ExitCode::FAILURE
        );
    }

    #[test]
    fn abandoned_blocking_tasks_do_not_hold_the_exit() {
        use std::time::{Duration, Instant};

        let started = Instant::now();
        let code = Program::new("test").abandon_blocking_tasks().run(async {
            // As a thread blocked reading stdin would.
            tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_secs(10)));
            Ok(ExitCode::SUCCESS)
        });
        assert_eq!(code, ExitCode::SUCCESS);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
