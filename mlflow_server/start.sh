#!/usr/bin/env bash
# Run the MLflow tracking server a team or a Ray cluster shares: a sqlite store and an
# artifact folder under DIR, artifacts served through the server, bound to 127.0.0.1
# unless --host says otherwise. Anything after `--` goes to `mlflow server` as is
# (e.g. -- --workers 4 --allowed-hosts tracking.example.org).
#
#   mlflow_server/start.sh [--port PORT] [--data DIR] [--host HOST] [-- MLFLOW_SERVER_ARGS...]
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
port=5000
data=./mlflow-server-data
host=127.0.0.1
while [[ $# -gt 0 ]]; do
  case $1 in
    --port) port=${2:?--port needs a value}; shift 2 ;;
    --data) data=${2:?--data needs a value}; shift 2 ;;
    --host) host=${2:?--host needs a value}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "start.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ $port =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
  echo "start.sh: --port must be a number from 1 to 65535, not '$port'" >&2; exit 2
fi

here=$(cd "$(dirname "$0")" && pwd)
if [[ -x $here/../.venv/bin/mlflow ]]; then
  bin=$here/../.venv/bin; py=("$bin/python")
else
  found=$(command -v mlflow) || { echo "start.sh: no mlflow here: run make setup, or install mlflow" >&2; exit 1; }
  bin=$(dirname "$found")
  # the interpreter mlflow runs with, from its first line (a pipx install has no python beside it)
  read -r -a py <<< "$(sed -n '1s/^#! *//p' "$found")"
  "${py[@]}" -c 'import mlflow' 2>/dev/null || py=(python3)
fi
mkdir -p "$data/artifacts"
data=$(cd "$data" && pwd)
store="sqlite:///$data/mlflow.db"

# A port already served: `mlflow server` reports it and still exits 0, while /health answers from
# the other server (another store). Refuse it here, loudly.
if "${py[@]}" -c "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)" \
    "$host" "$port" 2>/dev/null; then
  echo "start.sh: something already listens on $host:$port; choose another --port" >&2; exit 1
fi

# Create the schema once, before the server's workers start: concurrent first-time
# creation of a sqlite store races. The Default experiment it makes stores its artifacts
# through the server (mlflow-artifacts:), as the server's own would, not in ./mlruns here.
schema='import sys; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as S; S(sys.argv[1], "mlflow-artifacts:/")'
"${py[@]}" -c "$schema" "$store" >/dev/null 2>&1 || "${py[@]}" -c "$schema" "$store"

# MLflow 3's server starts a job runner and several task consumers for its GenAI features;
# experiment tracking needs none of them. Set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to keep them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

echo "MLflow server on http://$host:$port (store $store, artifacts $data/artifacts)"
echo "clients: --tracking-uri http://$host:$port   or   export MLFLOW_TRACKING_URI=http://$host:$port"
exec "$bin/mlflow" server --backend-store-uri "$store" --artifacts-destination "$data/artifacts" \
  --serve-artifacts --host "$host" --port "$port" "$@"
