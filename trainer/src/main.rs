//! `vissl`: train and evaluate self-supervised vision models from VISSL configs.

use clap::{Parser, Subcommand};
use vissl_trainer::{commands, logging};

/// Overrides as VISSL users type them: `config=pretrain/simclr/quick_cpu_fmnist`, `config.A.B=value`,
/// `+config.NEW_KEY=value`, `+config/<group>=<file>`.
#[derive(clap::Args, Debug, Clone)]
struct Overrides {
    /// `config=<path>` and `config.KEY=VALUE` overrides, in order.
    #[arg(value_name = "OVERRIDES")]
    args: Vec<String>,
}

const EXAMPLES: &str = "Examples:
  vissl train config=pretrain/simclr/quick_cpu_fmnist
  vissl train config=pretrain/simclr/quick_cpu_fmnist config.DISTRIBUTED.NUM_PROC_PER_NODE=2
  vissl benchmark knn config=benchmark/nearest_neighbor/quick_cpu_fmnist_knn --baselines
  vissl config show config=pretrain/simclr/simclr_8node_resnet config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32
  vissl list losses

Configs are looked up under $VISSL_CONFIGS, else the configs/ folder shipped beside the binary.";

#[derive(Parser, Debug)]
#[command(
    name = "vissl",
    version,
    about = "Self-supervised vision training from VISSL configs, on libtorch",
    after_help = EXAMPLES
)]
struct Cli {
    /// Log format: `text` (default) or `json`.
    #[arg(long, global = true, env = "VISSL_LOG_FORMAT", default_value = "text")]
    log_format: logging::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Inspect and check configs.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print every registered name of a kind (losses, trunks, heads, transforms, collators,
    /// data_sources, meters, schedulers, optimizers, hooks).
    List {
        /// The registry kind.
        kind: String,
    },
    /// Train from a VISSL config (`engine_name=extract_features` extracts features instead). Resumes from
    /// the newest verified checkpoint in CHECKPOINT.DIR when CHECKPOINT.AUTO_RESUME.
    Train(commands::train::Args),
    /// Wait until $MASTER_ADDR (node 0 of a multi-node run) resolves: the pod's init step.
    WaitForMaster(commands::wait::Args),
    /// Evaluate a trained model.
    #[command(subcommand)]
    Benchmark(BenchmarkCommand),
    /// Measure throughput.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
enum BenchmarkCommand {
    /// Weighted kNN (NEAREST_NEIGHBOR.*) on features of DATA.TRAIN (memory) and DATA.TEST (queries). The
    /// weights come from MODEL.WEIGHTS_INIT.PARAMS_FILE (else CHECKPOINT.DIR): a weights file, a checkpoint
    /// folder, or a CHECKPOINT.DIR (its newest verified checkpoint), as a path or an s3:// gs:// az:// URL.
    Knn(commands::benchmark::KnnArgs),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the fully resolved config (defaults, composition, overrides, inferred values) as YAML.
    Show(Overrides),
    /// Exit non-zero (64) with the key, the file and the reason when the config is invalid; the
    /// model, optimizer and loss are built as `train` builds them, without reading data.
    Validate(Overrides),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Images/s of the configured DATA.TRAIN pipeline, beside a torchvision+PIL reference run.
    Data(commands::bench_data::Args),
    /// Training images/s of 1 rank x 2 threads against 2 ranks x 1 thread at the same global batch,
    /// with the time split into compute, all-reduce and data wait.
    Dist(vissl_trainer::dist::bench::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Config(ConfigCommand::Show(o)) => commands::config::show(&o.args),
        Command::Config(ConfigCommand::Validate(o)) => commands::config::validate(&o.args),
        Command::List { kind } => commands::list::run(&kind),
        Command::Train(args) => commands::train::run(&args),
        Command::WaitForMaster(args) => commands::wait::run(&args),
        Command::Benchmark(BenchmarkCommand::Knn(args)) => commands::benchmark::knn(&args),
        Command::Bench(BenchCommand::Data(args)) => commands::bench_data::run(&args),
        Command::Bench(BenchCommand::Dist(args)) => vissl_trainer::dist::bench::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(vissl_trainer::exit::code_for(&err))
        }
    }
}
