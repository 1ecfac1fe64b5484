//! `verify-bench`: what checking a module's signature costs. Given PEM public keys, a
//! module and its detached signature (base64, as `cosign sign-blob` writes it), verifies
//! it `--rounds` times and prints the time per check (decoding the signature, parsing the
//! keys and verifying, as the fetcher does for each module it fetches).

use std::{path::PathBuf, time::Instant};

use clap::Parser;
use filterplane_wasm::sign::{decode_signature, verified_by, PublicKey};

#[derive(Debug, Parser)]
#[command(name = "verify-bench", version)]
struct Args {
    module: PathBuf,
    signature: PathBuf,
    /// Trusted PEM public keys, in the order they are tried.
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 200)]
    rounds: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let module = std::fs::read(&args.module)?;
    let text = std::fs::read(&args.signature)?;
    let pems: Vec<(String, String)> = args
        .keys
        .iter()
        .map(|k| Ok((k.display().to_string(), std::fs::read_to_string(k)?)))
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let mut by = None;
    for _ in 0..args.rounds {
        let sig = decode_signature(&text).map_err(anyhow::Error::msg)?;
        let keys: Vec<PublicKey> = pems.iter().map(|(n, p)| PublicKey::from_pem(n, p)).collect::<Result<_, _>>()?;
        by = verified_by(&keys, &module, &sig).map(|k| k.name.clone());
    }
    let per = started.elapsed().as_secs_f64() * 1e3 / f64::from(args.rounds);
    println!(
        "verify-bench: {} bytes, {} key(s): {per:.3} ms per check (signed by {})",
        module.len(),
        pems.len(),
        by.as_deref().unwrap_or("none of them")
    );
    Ok(())
}
