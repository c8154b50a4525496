//! `concord`: the command line of concord, built on the SDK.
//!
//! ```text
//! concord [--endpoint URL]... [--json] <command>
//! ```
//!
//! Output is for people by default and JSON with `--json`. Any error
//! prints one line, `concord: <what went wrong>`, and exits with 1 (2 for
//! a malformed command line).

mod dev;
mod output;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use concord_client::{Client, ClientOptions, Health, KeyspaceType, RangeStart, StreamId};
use tokio_stream::StreamExt;

use crate::output::Out;

/// The default endpoint: the first region of `concord dev`.
const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7101";

/// Command line of concord, the active-active CRDT replication layer.
#[derive(Debug, Parser)]
#[command(name = "concord", version, about)]
struct Cli {
    /// A region's gRPC endpoint; repeat it (or separate with commas) to
    /// fail over to the next when one is unavailable.
    #[arg(
        long = "endpoint",
        short = 'e',
        global = true,
        env = "CONCORD_ENDPOINT",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINT
    )]
    endpoints: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Longest wait for an answer, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000, value_name = "MS")]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list and describe keyspaces.
    #[command(subcommand)]
    Keyspace(KeyspaceCmd),
    /// Counters: increment and read.
    #[command(subcommand)]
    Counter(CounterCmd),
    /// Sets: add, remove, list and test members.
    #[command(subcommand)]
    Set(SetCmd),
    /// Registers: write and read.
    #[command(subcommand)]
    Register(RegisterCmd),
    /// Streams: append, read, follow and trim.
    #[command(subcommand)]
    Stream(StreamCmd),
    /// The region's status: identity, clock, applied vector, and per peer
    /// its state, last contact, lag both ways and why a link is down.
    Status {
        /// Redraw the status every `--interval-ms` until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// How often `--watch` redraws, in milliseconds.
        #[arg(long, default_value_t = 1_000, value_name = "MS", requires = "watch", value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
        interval_ms: u64,
    },
    /// Ask the region's gRPC health service whether it is serving; exits
    /// with 0 if it is and 1 if not (for container and orchestrator
    /// health checks).
    Health {
        /// The gRPC service to ask about; the node as a whole when empty.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Start a local multi-region cluster, one concord-node process per
    /// region; Ctrl-C stops them all.
    Dev(dev::DevArgs),
}

#[derive(Debug, Subcommand)]
enum KeyspaceCmd {
    /// Create a keyspace (nothing happens if it exists with the same type).
    Create {
        /// Keyspace name.
        name: String,
        /// Its type.
        #[arg(long = "type", short = 't', value_parser = parse_type)]
        ty: KeyspaceType,
    },
    /// List every keyspace.
    List,
    /// Describe one keyspace (or a conflict alias `name#type`).
    Describe {
        /// Keyspace name.
        name: String,
    },
}

#[derive(Debug, Args)]
struct KeyArgs {
    /// Keyspace.
    keyspace: String,
    /// Key.
    key: String,
}

#[derive(Debug, Subcommand)]
enum CounterCmd {
    /// Add to a counter (a negative amount subtracts); prints the new value.
    Incr {
        #[command(flatten)]
        at: KeyArgs,
        /// Amount.
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
    },
    /// Read a counter.
    Get {
        #[command(flatten)]
        at: KeyArgs,
    },
}

#[derive(Debug, Subcommand)]
enum SetCmd {
    /// Add members.
    Add {
        #[command(flatten)]
        at: KeyArgs,
        /// Members.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Remove members.
    Rm {
        #[command(flatten)]
        at: KeyArgs,
        /// Members.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// List members.
    Members {
        #[command(flatten)]
        at: KeyArgs,
    },
    /// Test whether a member is in the set; prints true or false.
    Contains {
        #[command(flatten)]
        at: KeyArgs,
        /// Member.
        member: String,
    },
}

#[derive(Debug, Subcommand)]
enum RegisterCmd {
    /// Write a register.
    Set {
        #[command(flatten)]
        at: KeyArgs,
        /// Value: the text itself, `-` to read it from standard input,
        /// `@PATH` to read it from a file (`@@...` for text starting with
        /// `@`).
        value: String,
    },
    /// Read a register.
    Get {
        #[command(flatten)]
        at: KeyArgs,
    },
}

#[derive(Debug, Subcommand)]
enum StreamCmd {
    /// Append an entry; prints its id.
    Append {
        #[command(flatten)]
        at: KeyArgs,
        /// Fields, as FIELD=VALUE; a VALUE of `-` is read from standard
        /// input, `@PATH` from a file (`@@...` for text starting with `@`).
        #[arg(required = true, value_parser = parse_field)]
        fields: Vec<(String, String)>,
    },
    /// Read entries in id order.
    Range {
        #[command(flatten)]
        at: KeyArgs,
        /// First id (inclusive).
        #[arg(long, value_parser = parse_id, conflicts_with = "after")]
        from: Option<StreamId>,
        /// Start right after this id (exclusive): the last id of the
        /// previous page.
        #[arg(long, value_parser = parse_id)]
        after: Option<StreamId>,
        /// Last id (inclusive).
        #[arg(long, value_parser = parse_id)]
        to: Option<StreamId>,
        /// Most entries (0: the server's limit, 10,000 by default). When
        /// more follow, a note on standard error says how to go on (with
        /// --json, `more` is true).
        #[arg(long, default_value_t = 0)]
        count: u32,
    },
    /// Follow a stream: print entries as they are appended, until Ctrl-C.
    Tail {
        #[command(flatten)]
        at: KeyArgs,
        /// Print the entries after this id first.
        #[arg(long, value_parser = parse_id)]
        after: Option<StreamId>,
    },
    /// Remove the entries with ids below BEFORE, in every region.
    Trim {
        #[command(flatten)]
        at: KeyArgs,
        /// The first id to keep.
        #[arg(long, value_parser = parse_id)]
        before: StreamId,
    },
}

fn parse_type(s: &str) -> Result<KeyspaceType, String> {
    s.parse().map_err(|e: concord_client::Error| e.to_string())
}

fn parse_id(s: &str) -> Result<StreamId, String> {
    s.parse().map_err(|e: concord_client::Error| e.to_string())
}

/// Most bytes the CLI reads for one value from standard input or a file:
/// the node's gRPC message limit (a node's own `max_value_bytes`, 1 MiB
/// by default, refuses less).
const MAX_VALUE_READ: u64 = 16 << 20;

/// A value argument: the text itself; `-`, standard input; `@PATH`, the
/// file's bytes; `@@...`, the text after the first `@`.
fn value_of(arg: &str) -> Result<Vec<u8>, concord_client::Error> {
    use std::io::Read;
    let invalid = concord_client::Error::InvalidArgument;
    let read = |from: &mut dyn Read, what: &str| {
        let mut bytes = Vec::new();
        from.take(MAX_VALUE_READ + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| invalid(format!("cannot read {what}: {e}")))?;
        if bytes.len() as u64 > MAX_VALUE_READ {
            return Err(invalid(format!(
                "{what} holds more than {MAX_VALUE_READ} bytes, more than one value can be"
            )));
        }
        Ok(bytes)
    };
    if arg == "-" {
        return read(&mut std::io::stdin().lock(), "standard input");
    }
    if let Some(text) = arg.strip_prefix("@@") {
        return Ok(format!("@{text}").into_bytes());
    }
    if let Some(path) = arg.strip_prefix('@') {
        let mut file =
            std::fs::File::open(path).map_err(|e| invalid(format!("cannot open {path}: {e}")))?;
        return read(&mut file, path);
    }
    Ok(arg.as_bytes().to_vec())
}

fn parse_field(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("{s:?} is not FIELD=VALUE")),
    }
}

/// A command-line error in one line: clap's message without its layout,
/// and the usage of the command it was about.
fn usage_error(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let (message, rest) = rendered
        .split_once("\n\n")
        .unwrap_or((rendered.as_str(), ""));
    let message = message.trim_start_matches("error: ");
    let mut line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(usage) = rest.lines().find_map(|l| l.strip_prefix("Usage: ")) {
        line.push_str(&format!("; usage: {}", usage.trim()));
    }
    line.push_str(" (see --help)");
    line
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    ExitCode::from(2)
                }
                _ => {
                    eprintln!("concord: {}", usage_error(&e));
                    ExitCode::from(2)
                }
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("concord: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the error.
            eprintln!("concord: {}", e.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let out = Out::new(cli.json);
    if let Command::Dev(args) = cli.command {
        return dev::run(args, out).await;
    }
    let options = ClientOptions {
        request_timeout: Duration::from_millis(cli.timeout_ms),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(cli.endpoints, options)
        .await
        .map_err(|e| e.to_string())?;
    if let Command::Health { service } = &cli.command {
        let health = client.health(service).await.map_err(|e| e.to_string())?;
        out.health(client.current_endpoint(), health);
        return match health {
            Health::Serving => Ok(()),
            other => Err(format!("{} is {other}", client.current_endpoint())),
        };
    }
    command(&client, cli.command, &out)
        .await
        .map_err(|e| e.to_string())
}

async fn command(
    client: &Client,
    command: Command,
    out: &Out,
) -> Result<(), concord_client::Error> {
    match command {
        Command::Keyspace(KeyspaceCmd::Create { name, ty }) => {
            let (info, created) = client.create_keyspace(&name, ty).await?;
            out.created(&info, created);
        }
        Command::Keyspace(KeyspaceCmd::List) => out.keyspaces(&client.list_keyspaces().await?),
        Command::Keyspace(KeyspaceCmd::Describe { name }) => {
            out.keyspace(&client.describe_keyspace(&name).await?)
        }
        Command::Counter(CounterCmd::Incr { at, by }) => {
            out.counter(client.counter(&at.keyspace).incr(&at.key, by).await?)
        }
        Command::Counter(CounterCmd::Get { at }) => {
            out.counter(client.counter(&at.keyspace).get(&at.key).await?)
        }
        Command::Set(SetCmd::Add { at, members }) => {
            out.write(client.set(&at.keyspace).add(&at.key, &members).await?)
        }
        Command::Set(SetCmd::Rm { at, members }) => {
            out.write(client.set(&at.keyspace).remove(&at.key, &members).await?)
        }
        Command::Set(SetCmd::Members { at }) => {
            out.members(&client.set(&at.keyspace).members(&at.key).await?)
        }
        Command::Set(SetCmd::Contains { at, member }) => {
            out.contains(client.set(&at.keyspace).contains(&at.key, member).await?)
        }
        Command::Register(RegisterCmd::Set { at, value }) => {
            let value = value_of(&value)?;
            out.write(client.register(&at.keyspace).set(&at.key, value).await?)
        }
        Command::Register(RegisterCmd::Get { at }) => {
            out.register(client.register(&at.keyspace).get(&at.key).await?.as_ref())
        }
        Command::Stream(StreamCmd::Append { at, fields }) => {
            if fields.iter().filter(|(_, v)| v == "-").count() > 1 {
                return Err(concord_client::Error::InvalidArgument(
                    "only one field can be read from standard input".into(),
                ));
            }
            let fields = fields
                .into_iter()
                .map(|(name, value)| Ok((name, value_of(&value)?)))
                .collect::<Result<Vec<(String, Vec<u8>)>, concord_client::Error>>()?;
            out.appended(client.stream(&at.keyspace).append(&at.key, fields).await?)
        }
        Command::Stream(StreamCmd::Range {
            at,
            from,
            after,
            to,
            count,
        }) => {
            let start = match (from, after) {
                (Some(id), _) => RangeStart::From(id),
                (None, Some(id)) => RangeStart::After(id),
                (None, None) => RangeStart::Beginning,
            };
            let page = client
                .stream(&at.keyspace)
                .page(&at.key, start, to, count)
                .await?;
            out.page(&page);
        }
        Command::Stream(StreamCmd::Tail { at, after }) => {
            let mut entries = client
                .stream(&at.keyspace)
                .subscribe(&at.key, after)
                .await?;
            loop {
                tokio::select! {
                    next = entries.next() => match next {
                        Some(entry) => out.entry_line(&entry?),
                        None => return Ok(()),
                    },
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
        Command::Stream(StreamCmd::Trim { at, before }) => {
            out.write(client.stream(&at.keyspace).trim(&at.key, before).await?)
        }
        Command::Status { watch: false, .. } => out.status(&client.status().await?),
        Command::Status {
            watch: true,
            interval_ms,
        } => {
            use std::io::IsTerminal;
            let terminal = std::io::stdout().is_terminal();
            let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
            let interrupted = tokio::signal::ctrl_c();
            tokio::pin!(interrupted);
            loop {
                let status = tokio::select! {
                    _ = &mut interrupted => return Ok(()),
                    status = async {
                        tick.tick().await;
                        client.status().await
                    } => status,
                };
                if terminal {
                    // Home the cursor and clear the screen: a redraw.
                    print!("\x1b[H\x1b[2J");
                }
                match status {
                    Ok(status) => out.status(&status),
                    // A region that does not answer is worth watching too.
                    Err(e) => eprintln!("concord: {e}"),
                }
                if !terminal {
                    println!();
                }
            }
        }
        Command::Dev(_) | Command::Health { .. } => {
            return Err(concord_client::Error::InvalidArgument(
                "this command is not a call on a region's data".into(),
            ))
        }
    }
    Ok(())
}
