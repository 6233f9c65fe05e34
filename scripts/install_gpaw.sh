#!/usr/bin/env bash
# Install GPAW 26.7.0 (real PBE DFT) with its PAW setups, offline apart from the package registries.
# Plain `pip install gpaw` fails here; this builds it against Debian's libxc/OpenBLAS/FFTW with g++.
set -euo pipefail
PY=${PYTHON:-python3}
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq libxc-dev libopenblas-dev libfftw3-dev >/dev/null
cfg=$(mktemp --suffix=.py)
cat > "$cfg" <<'CFG'
compiler = 'g++'
fftw = True
libraries = ['xc', 'openblas', 'fftw3']
CFG
GPAW_CONFIG="$cfg" $PY -m pip install --no-build-isolation gpaw==26.7.0 gpaw-data || \
GPAW_CONFIG="$cfg" $PY -m pip install gpaw==26.7.0 gpaw-data
$PY -c "import gpaw; print('gpaw', gpaw.__version__)"
