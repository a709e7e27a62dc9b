#!/bin/sh
# PostgreSQL image init script (compose mounts it in /docker-entrypoint-initdb.d/): runs once, on the
# first start of an empty data directory, as the superuser over the local socket. Creates the
# billing database and roles from roles.sql with the passwords of the compose secrets.
#
# No `set -u` / `exit`: the image's entrypoint sources a script that is not executable, and this
# must not change its shell; it already runs with `set -e`.

owner_password="$(cat "${BILLING_OWNER_PASSWORD_FILE:?BILLING_OWNER_PASSWORD_FILE is not set}")"
svc_password="$(cat "${BILLING_SVC_PASSWORD_FILE:?BILLING_SVC_PASSWORD_FILE is not set}")"

psql -v ON_ERROR_STOP=1 --no-psqlrc \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v owner_password="$owner_password" -v svc_password="$svc_password" \
    -f /etc/billing/roles.sql
