# Shortcuts for developers; the README never requires `just`.

# The demo (SQLite unless DATABASE_URL is set).
demo:
    cargo run --example quickstart

# Everything CI runs.
test:
    cargo test --workspace --features metrics

# Lints as CI expects them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

# Model-check the budget under all interleavings (slow).
loom:
    RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p pool-core --release --lib budget

# Benchmarks (compare against plain r2d2, bb8, deadpool / parking_lot / tokio in the same run).
bench:
    cargo run --release -p pool-bench
    cargo bench -p pool-core --bench budget
    cargo bench --bench retry

# The benchmark suite in under a minute.
bench-quick:
    cargo run --release -p pool-bench -- --quick
