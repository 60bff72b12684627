-- Rate windows shared by every server on this database (`AuditStore::admit_rate`): one row
-- per admitted event of a key (e.g. `executions:TENANT`) within its window; older rows are
-- deleted as the window slides.
CREATE TABLE rate_events (
    key TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE INDEX rate_events_key_at ON rate_events (key, at_ms);
