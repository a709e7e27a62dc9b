-- The billing database and its roles (README.md, "Who may change the ledger"). Run once per
-- PostgreSQL server, as a superuser, with the two login passwords as psql variables:
--
--   psql -v ON_ERROR_STOP=1 -v owner_password=... -v svc_password=... -f deploy/postgres/roles.sql
--
-- (compose runs it at the first start of an empty data directory: deploy/postgres/init-roles.sh.)
-- psql quotes :'...' variables as literals, so a password cannot inject SQL.
--
--   billing_owner     LOGIN   owns the database and the schema; `billing migrate` logs in as it
--   billing_app       NOLOGIN the service's privileges, granted by the migrations: SELECT/INSERT on
--                             the log and the journal, never UPDATE/DELETE/ALTER
--   billing_readonly  NOLOGIN finance reads (the migrations grant it SELECT on the report views)
--   billing_svc       LOGIN   what `billing up` logs in as; member of billing_app and nothing else,
--                             so even RESET ROLE leaves it without a way to rewrite history
--
-- billing_app and billing_readonly are created here, not by the migrations: the owner then needs
-- no CREATEROLE (it has no privilege on roles at all).

\set ON_ERROR_STOP on

CREATE ROLE billing_owner LOGIN PASSWORD :'owner_password';
CREATE DATABASE billing OWNER billing_owner;

CREATE ROLE billing_app NOLOGIN;
CREATE ROLE billing_readonly NOLOGIN;
CREATE ROLE billing_svc LOGIN PASSWORD :'svc_password' IN ROLE billing_app;

-- Only the owner and the service connect to the billing database.
REVOKE ALL ON DATABASE billing FROM PUBLIC;
GRANT CONNECT ON DATABASE billing TO billing_svc;
