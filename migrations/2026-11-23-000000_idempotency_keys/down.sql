DROP TABLE IF EXISTS resilient_diesel_idempotency_keys;
