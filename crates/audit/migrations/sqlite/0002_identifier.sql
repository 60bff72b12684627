-- The caller's identifier (ACA/MCP session name), the request id and the execution id as
-- columns, so records can be found by them (`GET /v1/audit?identifier=`, `?execution=`).
-- Each is also in the hashed body; `verify` checks that the columns say what it says.
ALTER TABLE audit_records ADD COLUMN execution TEXT;
ALTER TABLE audit_records ADD COLUMN identifier TEXT;
ALTER TABLE audit_records ADD COLUMN request_id TEXT;
-- Records written before this migration had their execution id in the body only.
UPDATE audit_records SET execution = json_extract(body, '$.execution');
CREATE INDEX audit_records_tenant_execution ON audit_records (tenant, execution);
CREATE INDEX audit_records_tenant_identifier ON audit_records (tenant, identifier);
