-- Idempotency keys for diesel_r2d2_ext::retry::commit_with_key: one row per committed keyed
-- transaction, written in the same transaction as the work it guards. Portable across
-- PostgreSQL, SQLite and MySQL/MariaDB. Prune old rows as your retention allows.
CREATE TABLE IF NOT EXISTS resilient_diesel_idempotency_keys (
    idempotency_key VARCHAR(255) PRIMARY KEY,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
