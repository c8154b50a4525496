//! The `concord` command line.

fn main() -> std::process::ExitCode {
    eprintln!("concord: no commands are available in this build yet");
    std::process::ExitCode::from(2)
}
