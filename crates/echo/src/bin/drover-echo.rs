//! `drover-echo --listen ADDR --name NAME`: see the library's documentation for its paths.

use clap::Parser;

/// A small origin server for tests and demos.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: std::net::SocketAddr,
    /// Name that starts every body and fills the x-echo-name header.
    #[arg(long, default_value = "echo")]
    name: String,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!(
        "drover-echo {} listening on {}",
        args.name,
        listener.local_addr()?
    );
    drover_echo::serve(listener, args.name).await;
    Ok(())
}
