#!/bin/sh
# Grafana's entrypoint in deploy/compose.yaml: on the first start, writes a
# random admin password to $GF_SECURITY_ADMIN_PASSWORD__FILE (in the data
# volume, so it survives restarts and is never "admin"), says where to read
# it, then runs the command (Grafana's /run.sh). Grafana uses the password
# when it creates the admin user, on a fresh data volume.
set -eu
file="${GF_SECURITY_ADMIN_PASSWORD__FILE:?set GF_SECURITY_ADMIN_PASSWORD__FILE to the password file}"
if [ ! -s "$file" ]; then
    umask 077
    # LC_ALL=C: tr reads raw bytes, which are not valid text in a UTF-8 locale.
    LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32 >"$file.new"
    mv "$file.new" "$file"
    echo "first start: generated the Grafana admin password (user admin);" \
         "read it with: docker compose -f deploy/compose.yaml exec grafana cat $file" >&2
fi
exec "$@"
