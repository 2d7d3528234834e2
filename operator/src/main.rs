//! `vissl-operator`: runs the SSLTraining controller, or prints its CRD.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    vissl_operator::install_crypto_provider();
    vissl_operator::cli::main().await
}
