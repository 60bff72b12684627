-- The audit log: one hash-chained row per execution, session event or egress decision.
CREATE TABLE audit_records (
    seq INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    pool TEXT NOT NULL,
    session TEXT NOT NULL,
    status TEXT,
    language TEXT,
    duration_ms DOUBLE PRECISION,
    cpu_time_ms DOUBLE PRECISION,
    peak_memory_bytes BIGINT,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_records_tenant_time ON audit_records (tenant, time_ms);
CREATE INDEX audit_records_tenant_session ON audit_records (tenant, session);
-- The chain's head (last appended record) and anchor (last pruned record).
CREATE TABLE audit_chain (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    head_seq BIGINT NOT NULL,
    head_hash TEXT NOT NULL,
    anchor_seq BIGINT NOT NULL,
    anchor_hash TEXT NOT NULL
);
INSERT INTO audit_chain (id, head_seq, head_hash, anchor_seq, anchor_hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000',
        0, '0000000000000000000000000000000000000000000000000000000000000000');
