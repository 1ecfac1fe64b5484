//! `make-module OUT VALUE [SIZE]`: writes a proxy-wasm module that adds `x-wasm: VALUE`,
//! padded with a data segment to about SIZE bytes (for the Wasm delivery benchmarks).

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (out, value) = match (args.get(1), args.get(2)) {
        (Some(o), Some(v)) => (o, v),
        _ => anyhow::bail!("usage: make-module OUT VALUE [SIZE]"),
    };
    let size: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(0);
    // Padding lives above the 1 MiB the module's allocator uses; memory grows to fit.
    let pages = 17 + size.div_ceil(65536) + 1;
    let padding = if size > 0 { format!("(data (i32.const 1114112) \"{}\")", "p".repeat(size)) } else { String::new() };
    let text = include_str!("../../../e2e/testdata/add_header.wat")
        .replace("{VALUE}", value)
        .replace("{LEN}", &value.len().to_string())
        .replace("(memory (export \"memory\") 17)", &format!("(memory (export \"memory\") {pages})"))
        .replace("{EXTRA}", &padding);
    let bytes = wat::parse_str(text)?;
    std::fs::write(out, &bytes)?;
    println!("{out}: {} bytes", bytes.len());
    Ok(())
}
