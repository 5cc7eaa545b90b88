#!/usr/bin/env bash
# Installs the offline data sets that the loaders read (DESIGN.md §5); never fails the setup.
# Usage: scripts/install_data.sh PYTHON
PY=${1:-python3}
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      && echo "installed Debian's dataset-fashion-mnist" \
      || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"
  fi
else
  echo "note: not root with apt; Fashion-MNIST comes from \$LIPDP_DATA if set"
fi
exit 0
