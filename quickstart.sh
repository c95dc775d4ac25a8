#!/usr/bin/env bash
# The newcomer path: the whole pipeline on the sample corpora (see quickstart.py --help).
set -euo pipefail
cd "$(dirname "$0")"
exec python quickstart.py "$@"
