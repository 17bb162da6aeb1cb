#!/usr/bin/env bash
# airflow-init of docker-compose.yaml: runs once, as root, before every other service.
#
# The named volumes start out owned by root, so first (as root) create the folders
# the services write to and hand them to AIRFLOW_UID:0, the user every service runs
# as, the way Airflow's own compose file prepares its folders. Then, as AIRFLOW_UID,
# migrate the metadata database and write the admin password file, so whatever init
# writes belongs to the user that reads it. An object-store artifacts root
# (ALEXNET_ARTIFACTS=s3://bucket/prefix) has no folder here to prepare: the objectstore
# profile's minio-init creates its bucket.
#
# Reads: AIRFLOW_UID, AIRFLOW_ADMIN_PASSWORD, ALEXNET_ARTIFACTS,
# AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE and AIRFLOW_HOME (its logs/ folder,
# or AIRFLOW__LOGGING__BASE_LOG_FOLDER).
set -euo pipefail

uid="${AIRFLOW_UID:?set AIRFLOW_UID (the user the services run as)}"
: "${AIRFLOW_ADMIN_PASSWORD:?set AIRFLOW_ADMIN_PASSWORD in .env}"
passwords="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?}"
artifacts="${ALEXNET_ARTIFACTS:?}"
case "$artifacts" in
  file://* | local://*) artifacts="${artifacts#*://}" ;;  # the folder itself
  *://*) echo "ALEXNET_ARTIFACTS=$artifacts: an object store, no local folder to prepare"; artifacts="" ;;
esac
logs="${AIRFLOW__LOGGING__BASE_LOG_FOLDER:-${AIRFLOW_HOME:-/opt/airflow}/logs}"
auth="$(dirname "$passwords")"

if [[ "$uid" == 0 ]]; then
  echo "AIRFLOW_UID=0: the services must not run as root; set AIRFLOW_UID in .env" >&2
  exit 1
fi

# Run a command as AIRFLOW_UID with group 0 (the group the Airflow image gives its files).
as_airflow() {
  if [[ "$(id -u)" == "$uid" ]]; then
    "$@"
  elif command -v setpriv >/dev/null; then
    setpriv --reuid="$uid" --regid=0 --clear-groups -- "$@"
  elif command -v gosu >/dev/null; then
    gosu "$uid:0" "$@"
  else
    echo "neither setpriv nor gosu: cannot drop from root to AIRFLOW_UID=$uid" >&2
    exit 1
  fi
}

# 1. As root: the folders of the named volumes, owned by AIRFLOW_UID:0, group-writable
#    (the image's convention for arbitrary user ids). Only what is not owned that way
#    yet is changed, so a large artifacts volume is cheap to check on every start.
folders=(${artifacts:+"$artifacts"} "$logs" "$auth")
for folder in "${folders[@]}"; do
  mkdir -p "$folder"
  find "$folder" \( ! -uid "$uid" -o ! -gid 0 \) -exec chown -h "$uid:0" {} +
  chmod u+rwx,g+rwx "$folder"
done
chmod o-rwx "$auth"  # the password file's folder is for the services only

# 2. As AIRFLOW_UID: the Airflow work and the files it writes.
as_airflow airflow db migrate
umask 077
as_airflow python -c '
import json, os, sys
path = sys.argv[1]
temporary = f"{path}.tmp-{os.getpid()}"
with open(temporary, "w") as handle:
    json.dump({"admin": os.environ["AIRFLOW_ADMIN_PASSWORD"]}, handle)
os.chmod(temporary, 0o600)
os.replace(temporary, path)
' "$passwords"

ls -ln "$passwords"
ls -lnd "${folders[@]}"
