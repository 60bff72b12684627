-- The caller's run id (from the context an agent sends with its calls) as a column, so a run's
-- records can be found (`GET /v1/audit?run_id=`). It is also in the hashed body (`context`);
-- `verify` checks that the column says what the body says.
ALTER TABLE audit_records ADD COLUMN run_id TEXT;
CREATE INDEX audit_records_tenant_run ON audit_records (tenant, run_id);
